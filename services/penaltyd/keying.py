"""How penaltyd names identities to its store: plain, or keyed tokens with sealed addresses.

Without `identity_key` the store sees identities as they are (`203.0.113.7`,
`100.64.1.1#<fingerprint>`). With it, the engine hands the store only tokens
(`penalty.keyed`): `k<address token>` and `k<address token>#<fingerprint token>`, so no
key, index member, HyperLogLog element or feed message names an address. Where an
operator needs the address back (ListPenalties, WatchPenalties, penaltyctl, logs), the
store holds it *sealed*: encrypted and authenticated with AES-256-SIV (RFC 5297) under a
key derived from `identity_key`, readable only by replicas that hold the key:

- a penalty carries its sealed identity after its compact reason (`reasons.SEAL`), so
  it travels with the penalty through every store, index and feed;
- a shared mark is indexed and announced under the sealed address (its *label*).

SIV is deterministic (the same identity always seals to the same text) on purpose: the
seal of an address is computed once and cached, so a report costs a dict lookup, and a
label names one index member however often the address is marked. Equality is all it
reveals, which the tokens reveal anyway.

Rotation: with `identity_key_previous`, checks, lifts and Disclose also look identities
up under the old key's tokens, and seals open with either key, so penalties started
before the roll-out keep answering; reports and new penalties use the new key. The old
key may be dropped once the longest retention of any key has passed
(`penaltyd.retention.rotation_seconds`, docs/privacy.md).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from penalty.identity import same_client
from penalty.keyed import IdentityKey
from penaltyd import reasons
from penaltyd.reasons import BIND, SEAL

_AAD = [b"penaltyd identity v1"]
_CACHE = 131_072  # identities whose tokens and seals are kept (~25 MB at most)


def _plain(value: str) -> str:
    return value


class Keying:
    """The engine's translation between identities and what the store holds.

    Unkeyed, every method is the identity function (no cost on the hot path).
    """

    def __init__(self, current: bytes | None = None, previous: bytes | None = None) -> None:
        self._key = IdentityKey(current) if current else None
        self._previous = IdentityKey(previous) if previous and current else None
        self._siv = [AESSIV(k.seal_key) for k in (self._key, self._previous) if k is not None]
        self.store_identity: Callable[[str], str] = _plain
        self.store_fingerprint: Callable[[str], str] = _plain
        self.label: Callable[[str], str] = _plain
        if self._key is not None:
            key = self._key
            self.store_identity = lru_cache(maxsize=_CACHE)(lambda i: self._tokens(key, i))
            self.store_fingerprint = key.fingerprint
            self.label = lru_cache(maxsize=_CACHE)(self._seal)
            self._store_marks = lru_cache(maxsize=_CACHE)(lambda m: self._marks(key, m))

    @property
    def keyed(self) -> bool:
        return self._key is not None

    @property
    def rotating(self) -> bool:
        return self._previous is not None

    @staticmethod
    def _tokens(key: IdentityKey, identity: str) -> str:
        address, sep, fp = identity.partition("#")
        token = key.token(address)
        return f"{token}#{key.fingerprint(fp)}" if sep else token

    def neighbourhood_name(self, network: str) -> str:
        """The store's name of a neighbourhood ("203.0.113.0/24"): its keyed token with a
        key (of "nb " + the network, so it never equals an identity's token)."""
        return network if self._key is None else self._key.token("nb " + network)

    def store_labels(self, plain: str) -> list[str]:
        """The shared-mark label of `plain` under each of `store_names`' keys, in order
        (its seal under that key; the name itself without a key)."""
        if self._key is None:
            return [plain]
        return [self.label(plain), *(self._seal(plain, siv) for siv in self._siv[1:])]

    def previous_identity(self, identity: str) -> str | None:
        """The store's name for `identity` under the previous key (during a rotation)."""
        return None if self._previous is None else self._tokens(self._previous, identity)

    def store_names(self, identity: str) -> list[str]:
        """Every name `identity` may have in the store: current key, then previous."""
        names = [self.store_identity(identity)]
        old = self.previous_identity(identity)
        if old is not None:
            names.append(old)
        return names

    def _seal(self, plain: str, siv: AESSIV | None = None) -> str:
        """`plain` sealed under the current key (or `siv`): "s" + base64url."""
        sealed = (siv or self._siv[0]).encrypt(plain.encode(), _AAD)
        return "s" + base64.urlsafe_b64encode(sealed).decode().rstrip("=")

    def open(self, sealed: str) -> str | None:
        """The plain text of a seal, with the current or the previous key; None if neither
        opens it (not a seal, or sealed under a key this replica does not hold)."""
        if not self._siv or not sealed.startswith("s"):
            return None
        body = sealed[1:]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except ValueError:
            return None
        for siv in self._siv:
            try:
                return siv.decrypt(raw, _AAD).decode()
            except (InvalidTag, ValueError, UnicodeDecodeError):
                continue
        return None

    def stored_reason(self, compact: str, plain_identity: str, marks: str = "") -> str:
        """The reason a penalty is stored with: its compact reason, the marks of the one
        client it binds (if any, in the store's form), plus the sealed identity (with the
        plain marks, so the watch feed can name them)."""
        if self._key is None:
            return f"{compact}{BIND}{marks}" if marks else compact
        if not marks:
            return f"{compact}{SEAL}{self.label(plain_identity)}"
        sealed = self.label(f"{plain_identity}{BIND}{marks}")
        return f"{compact}{BIND}{self.store_marks(marks)}{SEAL}{sealed}"

    def store_marks(self, marks: str) -> str:
        """A client's marks as the store holds them: each component keyed with a key."""
        if self._key is None or not marks:
            return marks
        return self._store_marks(marks)

    @staticmethod
    def _marks(key: IdentityKey, marks: str) -> str:
        return ".".join(key.fingerprint(m) if m else "" for m in marks.split("."))

    def binds(self, reason: str, marks: str) -> bool:
        """Whether a stored penalty applies to a client with (plain) `marks`: always, but
        for a penalty bound to another client (`penalty.identity.same_client`). During a
        rotation a penalty bound under the previous key compares under that key."""
        bound = reasons.bound(reason)
        if not bound or not marks:
            return True
        if same_client(bound, self.store_marks(marks)):
            return True
        return self._previous is not None and same_client(bound, self._marks(self._previous, marks))

    def reveal_bound(self, identity: str, reason: str) -> tuple[str, str, str]:
        """(plain identity, compact reason, plain marks of the client it binds or "") of a
        penalty as the store returned it, opening its seal once. The compact reason keeps
        a binding's marks (in the store's form): `reasons.render` reads them."""
        compact, sep, sealed = reason.partition(SEAL)
        if not sep:  # unkeyed: the store's marks are the plain ones
            return identity, compact, compact.partition(BIND)[2]
        plain, _, marks = (self.open(sealed) or identity).partition(BIND)
        return plain, compact, marks

    def reveal(self, identity: str, reason: str) -> tuple[str, str]:
        """(plain identity, compact reason) of a penalty as the store returned it."""
        return self.reveal_bound(identity, reason)[:2]

    def client_marks(self, reason: str) -> str:
        """The plain marks of the client a stored penalty binds ("" for the whole address)."""
        return self.reveal_bound("", reason)[2]

    def reveal_label(self, label: str) -> str:
        """The address a shared mark's label names (the label itself if it is not ours)."""
        return self.open(label) or label if self._key is not None else label


def main(argv: list[str] | None = None) -> int:
    """`python -m penaltyd.keying --log-key [--config FILE]`: print the log secret of the
    configured identity_key, for the sidecars' `--log-key-file` (their keyed log tokens
    then match penaltyd's). It is derived one way: it opens no seal and makes no store
    token, so it may live on an MX where the identity key must not."""
    import argparse
    import sys

    from penaltyd.settings import load_settings

    p = argparse.ArgumentParser(prog="python -m penaltyd.keying", description=main.__doc__)
    p.add_argument("--log-key", action="store_true", required=True)
    p.add_argument("--config", metavar="FILE", help="penaltyd's TOML settings file")
    args = p.parse_args(argv)
    try:
        secret = load_settings(args.config).log_key()
    except (OSError, ValueError) as exc:
        print(f"penaltyd.keying: {exc}", file=sys.stderr)
        return 2
    if secret is None:
        print("penaltyd.keying: no identity_key is configured", file=sys.stderr)
        return 2
    print(secret.decode())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
