"""The penalty contract, and only the contract: what penaltyd, relaycheck and the MX
clients must agree on to the byte.

- `penalty.v1`: the generated protobuf/gRPC code (from `proto/penalty/v1/*.proto`,
  reproduced by `make proto`).
- `penalty.identity`: identity derivation and the edge bounds (DESIGN.md s. 3).
- `penalty.outcomes`: the outcome vocabulary (names, numbers, the stores' slot width).
- `penalty.replies`: the default SMTP reply text.

Nothing here imports grpc.aio, redis, pydantic or structlog (a test walks the import
graph): serving plumbing is `serving`'s, each service's logic its own.
"""
