"""Stores: the protocol (`base`), the embedded `memory` backend and the fleet `redis` one.

Exception tree (mapped once, at the RPC boundary, in `penaltyd.api`)::

    StoreError
    ├── StoreUnavailable   the store did not answer in time or is unreachable: fail open
    └── StoreMisconfigured the store answered, but cannot serve (e.g. wrong URL / auth)
"""

from penaltyd.store.base import (
    Penalty,
    Store,
    StoreError,
    StoreMisconfigured,
    StoreUnavailable,
    Window,
)

__all__ = ["Penalty", "Store", "StoreError", "StoreMisconfigured", "StoreUnavailable", "Window"]
