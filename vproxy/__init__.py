"""vproxy: a Redis/Valkey proxy that multiplexes many clients onto a few backend connections."""

__version__ = "0.1.0"
