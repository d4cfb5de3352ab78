"""The penalty contract shared by penaltyd, relaycheck and the MX clients.

`penalty.v1` holds the generated protobuf/gRPC code (from `proto/penalty/v1/*.proto`,
reproduced by `make proto`); `penalty.identity` is the one implementation of identity
derivation (DESIGN.md section 3), imported by the service and the clients alike.
What penaltyd and relaycheck share without importing each other lives here too:
`penalty.grpc_support` (server plumbing), `penalty.config` (settings loading),
`penalty.logs` (JSON logs) and `penalty.testing` (real servers for tests and bench).
"""
