"""`vproxy audit`: read audit files (plain and gzipped) in time order, filter, print or summarize.

    paths (files, directories) -> one chain of files per directory, each sorted by its first record
      -> chains merged by time -> lines: cheap byte checks first (time range, command), then JSON
      -> filters -> table | json | csv  or  --summary (top lists, error rate, latency, a per-minute chart)

A line that is not a whole JSON record (a crash cut the last one) is skipped with a warning on stderr.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import gzip
import heapq
import json
import os
import re
import sys
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from fnmatch import fnmatchcase
from json.encoder import encode_basestring as _js
from time import monotonic

from .auditfmt import KEY_MAX, cut_key, text
from .auditwriter import ACTIVE, ROTATED, key_hash
from .twins import pure

PROGRESS_MIN = 8 << 20  # inputs at least this big get a progress bar (when stderr is a terminal)
_REL = re.compile(r"^-(\d+(?:\.\d+)?)\s*([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
FIELDS = ["ts", "node", "client_id", "client_addr", "client_name", "lib_name", "lib_ver", "user", "db",
          "command", "subcommand", "keys", "argc", "bytes", "backend", "latency_us", "outcome", "error"]


def parse_time(text: str, now: datetime | None = None) -> str:
    """'-15m', '2026-11-28T10:00', '2026-11-28 10:00:00+02:00' -> the record form, UTC:
    '2026-11-28T08:00:00.000000Z' (records compare as strings)."""
    now = now or datetime.now(timezone.utc)
    m = _REL.match(text.strip())
    if m:
        t = now - timedelta(seconds=float(m.group(1)) * _SECONDS[m.group(2)])
    else:
        try:
            t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            raise SystemExit(f"vproxy audit: cannot read the time {text!r} (ISO like 2026-11-28T10:00 or "
                             "relative like -15m, -2h, -1d)") from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=timezone.utc)
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---- files ----

def _files_of(paths: list[str]) -> list[list[str]]:
    """Chains: the files of each directory (or each file given) in the order they were written."""
    chains = []
    loose = []
    todo = list(paths)
    for p in paths:  # the workers of one vproxy (--workers N) write a subdirectory each
        if os.path.isdir(p):
            todo += sorted(os.path.join(p, n) for n in os.listdir(p) if n.startswith("worker-")
                           and os.path.isdir(os.path.join(p, n)))
    for p in todo:
        if os.path.isdir(p):
            names = os.listdir(p)
            # a crash between compressing and deleting leaves both: the .gz is whole, read it alone
            rotated = sorted(n for n in names if ROTATED.match(n) and n + ".gz" not in names)
            files = [os.path.join(p, n) for n in rotated]
            if ACTIVE in names:
                files.append(os.path.join(p, ACTIVE))
            if files:
                chains.append(files)
        elif os.path.exists(p):
            loose.append(p)
        else:
            raise SystemExit(f"vproxy audit: no such file or directory: {p}")
    if loose:
        loose.sort(key=_first_ts)
        chains.append(loose)
    return chains


def _open(path: str):
    raw = open(path, "rb")  # noqa: SIM115 - closed by the reader
    if path.endswith(".gz"):
        return raw, gzip.GzipFile(fileobj=raw)
    return raw, raw


def _first_ts(path: str) -> str:
    raw, f = _open(path)
    try:
        for line in f:
            if line.startswith(b'{"ts":"'):
                return line[7:34].decode()
        return ""
    except (OSError, EOFError):
        return ""
    finally:
        raw.close()


class Progress:
    """A progress bar on stderr, by bytes read of all the input files (compressed bytes for .gz)."""

    def __init__(self, total: int, on: bool):
        self.total, self.on, self.done, self.last = max(total, 1), on, 0, 0.0
        self.records = 0

    def update(self, done: int, force: bool = False) -> None:
        now = monotonic()
        if not self.on or (now - self.last < 0.2 and not force):
            return
        self.last = now
        frac = min(1.0, done / self.total)
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\r[{bar:<30}] {frac * 100:5.1f}%  {self.records:,} records")
        sys.stderr.flush()

    def end(self) -> None:
        """The final state stays on its line (records read in all)."""
        if self.on:
            self.update(self.total, force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.on = False


def read_lines(chain: list[str], progress: Progress, base: int, warn) -> iter:
    """The lines of one chain of files, whole records only (others are skipped with a warning)."""
    offset = base
    for path in chain:
        try:
            raw, f = _open(path)
        except OSError as e:
            warn(f"{path}: {e}")
            continue
        n = 0
        try:
            for n, line in enumerate(f, 1):
                if line[-1:] != b"\n":
                    warn(f"{path}:{n}: skipped a truncated last record ({len(line)} bytes; the writer "
                         "stopped in the middle of it)")
                    break
                if not n % 4096:
                    progress.records += 4096
                    progress.update(offset + raw.tell())
                yield line
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            warn(f"{path}: stopped reading after line {n}: {e}")
        finally:
            progress.records += n % 4096
            offset += os.fstat(raw.fileno()).st_size
            raw.close()


# ---- filters ----

class Filter:
    """The command line's filters: cheap byte checks on the raw line, then exact checks on the record."""

    def __init__(self, a, secret: bytes | None):
        self.since = parse_time(a.since) if a.since else None
        self.until = parse_time(a.until) if a.until else None
        self.commands = {c.strip().lower() for c in a.command.split(",")} if a.command else None
        self.user, self.client, self.db, self.outcome, self.node = a.user, a.client, a.db, a.outcome, a.node
        key = a.key
        if key and not re.search(r"[*?\[]", key) and len(key.encode()) > KEY_MAX:
            key = text(cut_key(key.encode()))  # an exact key too long for records: as they hold it
        self.key = key
        self.key_hashed = key_hash(secret, cut_key(a.key.encode())) if a.key and secret else None
        self.needles = [f'"command":"{c.split("|")[0]}"'.encode() for c in self.commands] if self.commands else None
        self.key_match = re.compile(fnmatch.translate(key)).match if key else None
        self.must = [m for m in (_field(b"user", a.user), _field(b"outcome", a.outcome), _field(b"node", a.node),
                                 b'"db":%d,' % a.db if a.db is not None else None,
                                 _literal(a.client), None if secret else _literal(key)) if m]
        self.checks_lines = bool(self.since or self.until or self.needles or self.must)
        self.needs_parse = any(v is not None for v in (self.commands, self.user, self.client, self.db,
                                                       self.outcome, self.node, self.key))

    def line_ok(self, line: bytes) -> bool:
        """Necessary conditions checked on the bytes (no JSON parsing)."""
        if self.since or self.until:
            ts = line[7:34].decode()
            if (self.since and ts < self.since) or (self.until and ts > self.until):
                return False
        if self.needles and not any(n in line for n in self.needles):
            return False
        return all(m in line for m in self.must)

    def ok(self, r: dict) -> bool:
        if self.commands is not None:
            cmd = r.get("command") or ""
            sub = r.get("subcommand")
            if cmd not in self.commands and not (sub and f"{cmd}|{sub}" in self.commands):
                return False
        if self.user is not None and r.get("user") != self.user:
            return False
        if self.client is not None and self.client not in (r.get("client_addr"), r.get("client_name"),
                                                           str(r.get("client_id"))) \
                and not fnmatchcase(r.get("client_addr") or "", self.client):
            return False
        if self.db is not None and r.get("db") != self.db:
            return False
        if self.outcome is not None and r.get("outcome") != self.outcome:
            return False
        if self.node is not None and r.get("node") != self.node:
            return False
        if self.key is not None:
            keys = r.get("keys") or []
            if r.get("keys_hashed"):
                if self.key_hashed is None or self.key_hashed not in keys:
                    return False
            elif not any(map(self.key_match, keys)):
                return False
        return True


def _field(name: bytes, value: str | None) -> bytes | None:
    """The bytes a record holding this exact string field must contain."""
    return None if value is None else b'"%s":%s' % (name, _js(value).encode())


def _literal(pattern: str | None) -> bytes | None:
    """The longest run of a glob's plain characters, as it appears inside a JSON string (a record
    matching the glob must contain it)."""
    if not pattern:
        return None
    runs = re.split(r"[*?\[\]]", pattern)
    best = max(runs, key=len)
    return _js(best)[1:-1].encode() if best else None


def records(chains: list[list[str]], flt: Filter, progress: Progress, warn, parse: bool = True):
    """(line, record) of every record that passes the filter, in time order. parse False (JSON
    output, no filter that reads fields): records are None, lines are checked by their shape only."""
    bases, base = [], 0
    for chain in chains:
        bases.append(base)
        base += sum(os.path.getsize(p) for p in chain)
    parse = parse or flt.needs_parse
    streams = [_parsed(read_lines(c, progress, b, warn), flt, warn, parse) for c, b in zip(chains, bases)]
    if len(streams) == 1:
        return streams[0]
    return heapq.merge(*streams, key=lambda lr: lr[0][7:34])


def _parsed(lines, flt: Filter, warn, parse: bool, chunk: int = 256):
    line_ok = flt.line_ok if flt.checks_lines else None
    ok = flt.ok if flt.needs_parse else None
    batch = []
    for line in lines:
        if not line.startswith(b'{"ts":"') or not line.endswith(b"}\n"):
            warn(f"skipped a line that is not a whole record: {line[:80]!r}")
            continue
        if line_ok is not None and not line_ok(line):
            continue
        if not parse:
            yield line, None
            continue
        batch.append(line)
        if len(batch) >= chunk:
            yield from _decoded(batch, ok, warn)
            batch = []
    if batch:
        yield from _decoded(batch, ok, warn)


def _decoded(lines: list, ok, warn):
    """Parse lines as one JSON array (one call, not one per line); line by line if one is bad."""
    try:
        recs = _loads(b"[" + b",".join(lines) + b"]")
    except ValueError:
        recs = []
        for line in lines:
            try:
                recs.append(_loads(line))
            except ValueError:
                warn(f"skipped a line that is not a whole record: {line[:80]!r}")
                recs.append(None)
    for line, r in zip(lines, recs):
        if r is not None and (ok is None or ok(r)):
            yield line, r


def _loads(data: bytes):
    return _decode(data.decode("utf-8", "surrogateescape"))[0]


_decode = json.JSONDecoder().raw_decode
PARSER = "json"
if not pure():  # VPROXY_PURE=1: the json module (as for resp.py's parser)
    try:  # orjson parses ~4x faster when it is installed (optional, as hiredis is for redis-py)
        from orjson import loads as _loads

        PARSER = "orjson"
    except ImportError:
        pass


# ---- output ----

def print_table(rows, out) -> int:
    head = f"{'time (UTC)':<26} {'client':<22} {'user':<8} {'db':>2} {'command':<16} {'keys':<28} " \
           f"{'outcome':<16} {'ms':>8} backend"
    out.write(head + "\n")
    n = 0
    buf = []
    for _, r in rows:
        keys = " ".join(r["keys"])
        if len(keys) > 28:
            keys = keys[:25] + "..."
        sub, err = r["subcommand"], r["error"]
        what = r["command"].upper() + (" " + sub.upper() if sub else "")
        outcome = r["outcome"] + (" " + err if err else "")
        client = r["client_name"] or r["client_addr"]
        buf.append(f"{r['ts'][:26]:<26} {client[:22]:<22} {r['user'][:8]:<8} {r['db']:>2} {what[:16]:<16} "
                   f"{keys:<28} {outcome[:16]:<16} {r['latency_us'] / 1000:>8.3f} {r['backend'] or '-'}\n")
        n += 1
        if len(buf) >= 1000:
            out.write("".join(buf))
            buf = []
    out.write("".join(buf))
    return n


def print_json(rows, out) -> int:
    n = 0
    for line, _ in rows:
        out.write(line.decode())
        n += 1
    return n


def print_csv(rows, out) -> int:
    w = csv.writer(out)
    w.writerow(FIELDS)
    n = 0
    for _, r in rows:
        w.writerow([" ".join(r.get(f) or []) if f == "keys" else ("" if r.get(f) is None else r.get(f))
                    for f in FIELDS])
        n += 1
    return n


def _pct(sorted_values: list, p: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def summarize(rows) -> dict:
    """Counts over the filtered records (see print_summary)."""
    cmds, clients, users, keys, outcomes, per_min = Counter(), Counter(), Counter(), Counter(), Counter(), Counter()
    lat: dict = defaultdict(list)
    errors = Counter()
    for _, r in rows:
        try:
            what = (r["command"], r["subcommand"])  # named at the end: one tuple, not two strings
            client, k, outcome, err = r["client_name"] or r["client_addr"], r["keys"], r["outcome"], r["error"]
            users[r["user"]] += 1
            lat[what].append(r["latency_us"])
            per_min[r["ts"][:16]] += 1
        except KeyError:  # a record from elsewhere, without every field
            continue
        cmds[what] += 1
        clients[client] += 1
        for x in k:
            keys[x] += 1
        outcomes[outcome] += 1
        if err:
            errors[err] += 1
    named = {w: w[0].upper() + (" " + w[1].upper() if w[1] else "") for w in cmds}
    cmds = Counter({named[w]: n for w, n in cmds.items()})
    lat = {named[w]: v for w, v in lat.items()}
    return {"total": sum(cmds.values()), "commands": cmds, "clients": clients, "users": users, "keys": keys,
            "outcomes": outcomes, "errors": errors, "latency": lat, "per_minute": per_min}


def print_summary(s: dict, out, top: int = 10) -> None:
    total = s["total"]
    out.write(f"records: {total:,}\n")
    if not total:
        return
    o = s["outcomes"]
    bad = o.get("error", 0) + o.get("refused", 0)
    out.write("outcomes: " + ", ".join(f"{k} {v:,}" for k, v in o.most_common()) +
              f"; error rate {bad / total * 100:.2f}%\n")
    if s["errors"]:
        out.write("errors: " + ", ".join(f"{k} {v:,}" for k, v in s["errors"].most_common(top)) + "\n")
    for title, key in (("commands", "commands"), ("clients", "clients"), ("users", "users"), ("keys", "keys")):
        out.write(f"\ntop {title}:\n")
        for name, n in s[key].most_common(top):
            out.write(f"  {n:>10,}  {name}\n")
    out.write(f"\nlatency per command (ms):\n  {'command':<24} {'count':>10} {'p50':>9} {'p95':>9} {'p99':>9}\n")
    for what, _ in s["commands"].most_common(top):
        v = sorted(s["latency"][what])
        out.write(f"  {what[:24]:<24} {len(v):>10,} {_pct(v, 50) / 1000:>9.3f} {_pct(v, 95) / 1000:>9.3f} "
                  f"{_pct(v, 99) / 1000:>9.3f}\n")
    out.write("\nrequests per minute:\n")
    out.write(chart(s["per_minute"]))


def chart(per_minute: Counter, rows: int = 30, width: int = 50) -> str:
    """A bar chart of requests per minute (minutes grouped when there are more than `rows`)."""
    if not per_minute:
        return ""
    minutes = sorted(per_minute)
    first = datetime.strptime(minutes[0], "%Y-%m-%dT%H:%M")
    last = datetime.strptime(minutes[-1], "%Y-%m-%dT%H:%M")
    span = int((last - first).total_seconds() // 60) + 1
    step = max(1, -(-span // rows))
    buckets = []
    for b in range(0, span, step):
        start = first + timedelta(minutes=b)
        n = sum(per_minute.get((start + timedelta(minutes=j)).strftime("%Y-%m-%dT%H:%M"), 0) for j in range(step))
        buckets.append((start, n / step))
    peak = max(n for _, n in buckets) or 1
    unit = "/min" if step == 1 else f"/min (avg of {step} min)"
    lines = []
    for start, n in buckets:
        bar = "█" * round(n / peak * width)
        lines.append(f"  {start:%Y-%m-%d %H:%M} {n:>10,.0f} {bar}")
    return "\n".join(lines) + f"\n  (requests{unit})\n"


# ---- the command ----

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vproxy audit", description="Query and summarize vproxy audit logs.")
    p.add_argument("paths", nargs="*", help="audit files (.jsonl, .jsonl.gz) or directories; default: "
                   "audit_dir of --config / VPROXY_AUDIT_DIR")
    p.add_argument("-c", "--config", help="vproxy's TOML file (for audit_dir and audit_hash_secret)")
    p.add_argument("--since", help="from this time: ISO (2026-11-28T10:00, UTC unless an offset is given) or "
                   "relative (-15m, -2h, -1d)")
    p.add_argument("--until", help="up to this time (same forms)")
    p.add_argument("--user")
    p.add_argument("--client", help="client address (host:port, or a glob like '10.0.0.5:*'), name or id")
    p.add_argument("--command", help="command names, comma-separated (set,del,config|set)")
    p.add_argument("--key", help="a key or a glob (keys*); with hashed keys: the exact key (needs the secret)")
    p.add_argument("--db", type=int)
    p.add_argument("--outcome", choices=["ok", "error", "refused", "sent"])
    p.add_argument("--node", help="the proxy node (its audit_node)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--summary", action="store_true", help="top commands, clients, users, keys, error rate, "
                   "latency per command, requests per minute")
    p.add_argument("--top", type=int, default=10, help="entries in each --summary list")
    p.add_argument("--hash-secret", help="audit_hash_secret, to find a key in hashed records "
                   "(default: from --config or VPROXY_AUDIT_HASH_SECRET)")
    p.add_argument("--progress", choices=["auto", "always", "never"], default="auto",
                   help="progress bar on stderr: auto (a terminal and big inputs)")
    return p


def _settings(a) -> tuple[list[str], bytes | None]:
    """Paths and hash secret, from the arguments, else the config file or the environment."""
    cfg = {}
    path = a.config or os.environ.get("VPROXY_CONFIG")
    if path:
        import toml

        try:
            cfg = toml.load(path)
        except (OSError, toml.TomlDecodeError) as e:
            raise SystemExit(f"vproxy audit: config file {path}: {e}") from None
    paths = a.paths or [d for d in [os.environ.get("VPROXY_AUDIT_DIR") or cfg.get("audit_dir")] if d]
    if not paths:
        raise SystemExit("vproxy audit: give audit files or directories (or --config with audit_dir)")
    secret = a.hash_secret or os.environ.get("VPROXY_AUDIT_HASH_SECRET") or cfg.get("audit_hash_secret")
    return paths, secret.encode() if secret else None


def _relative_times(argv: list[str]) -> list[str]:
    """`--since -15m` as `--since=-15m` (argparse would take -15m for an option)."""
    out, it = [], iter(argv)
    for arg in it:
        if arg in ("--since", "--until"):
            out.append(f"{arg}={next(it, '')}")
        else:
            out.append(arg)
    return out


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(_relative_times(argv))
    paths, secret = _settings(a)
    chains = _files_of(paths)
    total = sum(os.path.getsize(p) for c in chains for p in c)
    show = a.progress == "always" or (a.progress == "auto" and sys.stderr.isatty() and total >= PROGRESS_MIN)
    progress = Progress(total, show)
    warned = []

    def warn(text: str) -> None:
        warned.append(text)
        sys.stderr.write("\n" if progress.on else "")
        sys.stderr.write(f"vproxy audit: warning: {text}\n")

    flt = Filter(a, secret)
    rows = records(chains, flt, progress, warn, parse=a.summary or a.format != "json")
    out = sys.stdout
    try:
        if a.summary:
            s = summarize(rows)
            progress.end()
            print_summary(s, out, a.top)
        else:
            {"table": print_table, "json": print_json, "csv": print_csv}[a.format](rows, out)
            progress.end()
        out.flush()
    except BrokenPipeError:  # | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0
