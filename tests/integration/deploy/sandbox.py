"""Run a command inside the kernel-side sandbox a deploy/systemd unit asks for, without
systemd: what the unit's hardening would refuse, this refuses too.

    python -m tests.integration.deploy.sandbox deploy/systemd/penaltyd.service -- ARGV...

As root, in this process, then `execv(ARGV)`:
- a private mount namespace in which every mount is read-only (ProtectSystem=strict),
  a fresh tmpfs on /tmp (PrivateTmp=yes) and a fresh /proc with hidepid=invisible and
  subset=pid (ProtectProc=invisible, ProcSubset=pid);
- LimitNOFILE= (capped at this process's hard limit, which it cannot raise);
- an empty capability bounding set and no ambient capabilities (CapabilityBoundingSet=,
  AmbientCapabilities=), no_new_privs (NoNewPrivileges=yes);
- the seccomp filters systemd loads (src/shared/seccomp-util.c), each its own filter as
  there: SystemCallFilter= as an allow list (the sets expanded by `systemd-analyze
  syscall-filter`, `~` entries removed) answering SystemCallErrorNumber= for the rest;
  MemoryDenyWriteExecute=yes (mmap with PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect
  adding PROT_EXEC, shmat with SHM_EXEC refused with EPERM); RestrictAddressFamilies= (any
  other socket() family refused with EAFNOSUPPORT).

What is not reproduced: the transient user (the test venv's interpreter lives under
/root, so the command keeps uid 0, but without any capability on a read-only system),
ProtectHome= (same reason), and the settings that only hide or refuse what the programs
never use (PrivateDevices=, ProtectKernel*=, RestrictNamespaces=, ...).
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import shlex
import subprocess
import sys
from pathlib import Path

libc = ctypes.CDLL(None, use_errno=True)

# <linux/prctl.h>, <linux/capability.h>, <linux/mount.h>, <sys/mman.h>, <sys/shm.h>
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
CAP_LAST_CAP = 40
CLONE_NEWNS = 0x00020000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MOUNT_ATTR_RDONLY = 1
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
SYS_MOUNT_SETATTR = 442  # x86_64 and aarch64 share the new syscall numbers
PROT_WRITE, PROT_EXEC = 2, 4
SHM_EXEC = 0o100000
AF_MAX = 46

# <seccomp.h>
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
SCMP_CMP_MASKED_EQ = 7


def scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


class MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def _check(result: int, what: str) -> None:
    if result < 0:
        code = ctypes.get_errno() or -result
        raise OSError(code, f"{what}: {os.strerror(code)}")


def unit_settings(path: Path) -> dict[str, list[str]]:
    """[Service] key -> every value given, in order (keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def syscall_sets() -> dict[str, list[str]]:
    """Every set `systemd-analyze syscall-filter` knows: name -> entries (names or @sets)."""
    text = subprocess.run(
        ["systemd-analyze", "syscall-filter", "--no-pager"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    sets: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("@"):
            current = line.strip()
            sets[current] = []
        elif line.strip() and not line.strip().startswith("#") and current:
            sets[current].append(line.strip())
    return sets


def expand(entries: list[str], sets: dict[str, list[str]]) -> set[str]:
    out: set[str] = set()
    for entry in entries:
        out |= expand(sets[entry], sets) if entry.startswith("@") else {entry}
    return out


def allowed_syscalls(filters: list[str], sets: dict[str, list[str]]) -> set[str]:
    """SystemCallFilter= lines as systemd combines them: an allow list, less `~` entries."""
    allowed: set[str] = set()
    for line in filters:
        deny = line.startswith("~")
        names = expand(line.removeprefix("~").split(), sets)
        allowed = allowed - names if deny else allowed | names
    return allowed


class Seccomp:
    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_init.argtypes = [ctypes.c_uint32]
        self.lib.seccomp_rule_add_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(ArgCmp),
        ]
        self.lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        self.lib.seccomp_load.argtypes = [ctypes.c_void_p]
        self.lib.seccomp_release.argtypes = [ctypes.c_void_p]

    def number(self, name: str) -> int:
        return int(self.lib.seccomp_syscall_resolve_name(name.encode()))

    def load(
        self, default: int, rules: list[tuple[int, str, list[tuple[int, int, int, int]]]]
    ) -> None:
        """One filter: `default` action, then (action, syscall, [(arg, op, a, b), ...])."""
        ctx = self.lib.seccomp_init(default)
        if not ctx:
            raise OSError("seccomp_init failed")
        try:
            for action, name, conditions in rules:
                nr = self.number(name)
                if nr < 0:  # not a syscall of this architecture
                    continue
                array = (ArgCmp * max(1, len(conditions)))(*(ArgCmp(*c) for c in conditions))
                _check(
                    self.lib.seccomp_rule_add_array(ctx, action, nr, len(conditions), array),
                    f"seccomp rule for {name}",
                )
            _check(self.lib.seccomp_load(ctx), "seccomp_load")
        finally:
            self.lib.seccomp_release(ctx)


def mounts(settings: dict[str, list[str]]) -> None:
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    if settings.get("ProtectSystem", [""])[-1] == "strict":
        attr = MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
        _check(
            libc.syscall(
                SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr),
                ctypes.sizeof(attr),
            ),
            "mount_setattr(/, read-only, recursive)",
        )  # fmt: skip
    if settings.get("PrivateTmp", [""])[-1] == "yes":
        flags = MS_NOSUID | MS_NODEV
        _check(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", flags, b"mode=1777"), "tmpfs on /tmp")
    options = []
    if settings.get("ProtectProc", [""])[-1] == "invisible":
        options.append("hidepid=invisible")
    if settings.get("ProcSubset", [""])[-1] == "pid":
        options.append("subset=pid")
    if options:
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        data = ",".join(options).encode()
        _check(libc.mount(b"proc", b"/proc", b"proc", flags, data), f"proc ({data.decode()})")


def limits(settings: dict[str, list[str]]) -> None:
    if "LimitNOFILE" in settings:
        wanted = int(settings["LimitNOFILE"][-1])
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        value = min(wanted, hard)  # raising the hard limit needs CAP_SYS_RESOURCE
        resource.setrlimit(resource.RLIMIT_NOFILE, (value, value))


def privileges(settings: dict[str, list[str]]) -> None:
    if settings.get("CapabilityBoundingSet", ["x"])[-1] == "":
        for cap in range(CAP_LAST_CAP + 1):
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)  # EINVAL past the kernel's last: fine
        libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if settings.get("NoNewPrivileges", [""])[-1] == "yes":
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def filters(settings: dict[str, list[str]]) -> None:
    seccomp = Seccomp()
    if settings.get("MemoryDenyWriteExecute", [""])[-1] == "yes":
        refuse = scmp_act_errno(errno.EPERM)
        wx = PROT_WRITE | PROT_EXEC
        seccomp.load(
            SCMP_ACT_ALLOW,
            [
                (refuse, "mmap", [(2, SCMP_CMP_MASKED_EQ, wx, wx)]),
                (refuse, "mmap2", [(2, SCMP_CMP_MASKED_EQ, wx, wx)]),
                (refuse, "mprotect", [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
                (refuse, "pkey_mprotect", [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
                (refuse, "shmat", [(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)]),
            ],
        )
    if "RestrictAddressFamilies" in settings:
        names = settings["RestrictAddressFamilies"][-1].split()
        keep = {int(getattr(__import__("socket"), n)) for n in names}
        refuse = scmp_act_errno(errno.EAFNOSUPPORT)
        seccomp.load(
            SCMP_ACT_ALLOW,
            [
                (refuse, "socket", [(0, SCMP_CMP_EQ, family, 0)])
                for family in range(AF_MAX + 1)
                if family not in keep
            ],
        )

    # The allow list last, as systemd does: it refuses seccomp() itself.
    if "SystemCallFilter" in settings:
        error = getattr(errno, settings.get("SystemCallErrorNumber", ["EPERM"])[-1])
        allowed = allowed_syscalls(settings["SystemCallFilter"], syscall_sets())
        seccomp.load(scmp_act_errno(error), [(SCMP_ACT_ALLOW, n, []) for n in sorted(allowed)])


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(f"usage: {__name__} UNIT -- ARGV...", file=sys.stderr)
        return 2
    unit, command = Path(argv[0]), argv[2:]
    settings = unit_settings(unit)
    mounts(settings)
    limits(settings)
    privileges(settings)
    filters(settings)  # last: after it, mount(), prctl() and the like are refused
    print(f"sandbox: {unit.name}: exec {shlex.join(command)}", file=sys.stderr, flush=True)
    os.execv(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
