"""Backend connections: one socket, shared channels, leases, and the pool that holds them."""
