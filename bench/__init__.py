"""penaltyd benchmarks: `make bench` (``python -m bench``).

The figures that matter are ratios against floors measured in the same run on the same
machine: the Python gRPC ceiling (a zero-work echo service) and the raw redis-py round
trip on the same Redis. Absolute numbers on a shared two-core box move with everything
else running; ratios, and the CPU each call costs, move much less. See
docs/performance.md.

`make bench` modules: `runner` (orchestration, CLI), `procs` (the child servers),
`h2load` (unary load), `session_load` (Session stream load), `redis_floor` (Redis
floors), `probe` (proof that calls were real answers), `cpu` (where the CPU went),
`echo_server` (the ceiling), `report` (table, targets, JSON, medians of several runs),
`stats` (one result type, one percentile rule; shared with the other tools here).
"""
