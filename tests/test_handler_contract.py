"""The handler/session contract (vproxy/handler.py): the sessions offer what it declares, and the
handler modules use nothing else of a session."""

import ast
import inspect
from pathlib import Path

import pytest

from vproxy import handler
from vproxy.client import ClientSession, HASession
from vproxy.cluster.session import ClusterSession

ROOT = Path(__file__).resolve().parent.parent / "vproxy"
# modules whose functions take the session as `s`: fn(s, idx, args, raw, batch) and their helpers
HANDLERS = ["local.py", "admin.py", "gate.py", "users.py", "cluster/transaction.py", "cluster/keyless.py",
            "cluster/multikey.py", "cluster/setops.py", "cluster/namespaces.py"]


def declared(proto) -> set:
    names = set()
    for cls in proto.__mro__:
        if cls.__module__ == handler.__name__:
            names |= set(getattr(cls, "__annotations__", {}))
            names |= {n for n, v in vars(cls).items() if inspect.isfunction(v) and not n.startswith("__")}
    return names


def methods(proto) -> dict:
    out = {}
    for cls in reversed(proto.__mro__):
        if cls.__module__ == handler.__name__:
            out.update({n: v for n, v in vars(cls).items() if inspect.isfunction(v) and not n.startswith("__")})
    return out


@pytest.mark.parametrize("proto, impls", [(handler.Session, (ClientSession, HASession, ClusterSession)),
                                          (handler.ClusterSession, (ClusterSession,))])
def test_sessions_offer_the_declared_operations(proto, impls):
    for name, fn in methods(proto).items():
        want = list(inspect.signature(fn).parameters)
        for impl in impls:
            got = getattr(impl, name, None)
            assert callable(got), f"{impl.__name__} lacks {name}"
            params = list(inspect.signature(got).parameters)
            assert params[:len(want)] == want, f"{impl.__name__}.{name}{params} is not {want}"


def session_uses(path: Path) -> dict:
    """The attributes of `s` a module's functions touch, with a line of each."""
    used: dict = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "s":
            used.setdefault(node.attr, node.lineno)
    return used


@pytest.mark.parametrize("module", HANDLERS)
def test_handlers_use_only_the_contract(module):
    allowed = declared(handler.ClusterSession if module.startswith("cluster/") else handler.Session)
    used = session_uses(ROOT / module)
    extra = {n: line for n, line in used.items() if n not in allowed}
    assert not extra, f"{module} uses session attributes outside vproxy/handler.py: {extra}"
