"""The securityContext every hardened container must have.

Non-root (runAsNonRoot, and not runAsUser 0, either set on the container or inherited
from the pod), a read-only root filesystem, no privilege escalation and every capability
dropped. Which containers count as hardened is the caller's choice: all of an overlay's,
only penaltyd's own in the examples (the MTA beside it is the user's).
"""

from __future__ import annotations

from typing import Any

from .documents import Obj, as_dict, as_list
from .findings import Add


def check_hardening(
    obj: Obj, c: dict[str, Any], cwhere: str, pod_sc: dict[str, Any], add: Add
) -> None:
    """One container's securityContext (pod_sc: the pod's, for the inherited fields)."""
    sc = as_dict(c.get("securityContext"))
    name = c.get("name")
    run_as_non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    run_as_user = sc.get("runAsUser", pod_sc.get("runAsUser"))
    read_only = sc.get("readOnlyRootFilesystem")
    escalation = sc.get("allowPrivilegeEscalation")
    dropped = as_list(as_dict(sc.get("capabilities")).get("drop"))
    failing = (
        ("runAsNonRoot", run_as_non_root is not True, "must be true"),
        ("runAsUser", run_as_user == 0, "runs as root"),
        ("readOnlyRootFilesystem", read_only is not True, "must be true"),
        ("allowPrivilegeEscalation", escalation is not False, "must be false"),
        ("capabilities.drop", "ALL" not in dropped, "must drop ALL"),
    )
    for fld, bad, message in failing:
        if bad:
            add(obj, f"{cwhere}.securityContext.{fld}", f"container {name!r}: {message}")
