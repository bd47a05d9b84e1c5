//! End-to-end tests of the assembled GRS live in `tests/`: the webhook
//! gateway, the control plane, the GitHub simulator and the PVE simulator,
//! each on its own loopback port, talking over real HTTP and gRPC.
