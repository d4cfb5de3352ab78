"""Customer stores: `base` (the protocol and errors), `memory` (embedded), `redis` (fleet)."""
