"""The coordinator's gRPC service on top of `coderepair.coordinator.storage`.

- `server`: `Coordinator`, the grpc.aio server with its background loops (run/shutdown);
- `context`: what every servicer shares (config, database, object store, task pools);
- `gate`: refusals, signed-envelope checks (signature, clock, replay), the error mapping;
- `scheduler`: task pools, prompt rendering, per-sample seeds;
- `validation`: structural checks of a submitted batch, the BOINC audit rate;
- `worker_service`, `trainer_service`, `admin_service`: the three contract services;
- `audit`: the `Auditor` interface, the in-process audit loop;
- `stats`: network figures for the admin service and the dashboard;
- `commands`: `coderepair-coordinator serve` and `admin`.
"""
