"""Topology: what is behind the proxy and who is primary, published as immutable snapshots."""
