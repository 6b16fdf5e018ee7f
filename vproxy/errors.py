"""The exception tree and the error replies clients see."""


class VProxyError(Exception):
    """Base of every error vproxy raises on purpose."""


class ConfigError(VProxyError):
    """A setting is missing, malformed or out of range; the message names it."""


class StartError(VProxyError):
    """vproxy cannot start (the listen address is taken ...); the message names what and why."""


class ProtocolError(VProxyError):
    """A client or backend broke RESP; the message is the text after '-ERR Protocol error: '."""

    def __init__(self, msg: str):
        super().__init__(msg)
        self.requests: list = []  # requests parsed before the bad bytes: they still run


class BackendError(VProxyError):
    """A backend connection could not be made or was lost."""


# Error replies vproxy itself makes. Each is the text after the '-' of a RESP error.
NOAUTH = "NOAUTH Authentication required."
WRONGPASS = "WRONGPASS invalid username-password pair or user is disabled."
NOPASS = (
    "ERR AUTH <password> called without any password configured for the default user. "
    "Are you sure your configuration is correct?"
)
NOT_INTEGER = "ERR value is not an integer or out of range"
INT_MIN, INT_MAX = -(2**31), 2**31 - 1
INT_RANGE = f"ERR value is out of range, value must between {INT_MIN} and {INT_MAX}"  # (sic, the server's words)
DB_RANGE = "ERR DB index is out of range"
SYNTAX = "ERR syntax error"


def wrong_arity(name: str) -> str:
    return f"ERR wrong number of arguments for '{name}' command"


def refused(name: str, why: str) -> str:
    return f"ERR vproxy: '{name}' is not allowed through the proxy ({why})"


def backend_unavailable(addr: str, why: str) -> str:
    return f"ERR vproxy: backend {addr} unavailable ({why})"


def backend_timeout(addr: str, seconds: float) -> str:
    return f"ERR vproxy: backend {addr} did not answer within {seconds:g}s (command_timeout); connection replaced"
