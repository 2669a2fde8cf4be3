"""Configuration: the TOML file of SPEC §3 and the ``flypool run`` flags, as frozen dataclasses.

Theory of operation: every key has exactly one *check* in ``_DAEMON_CHECKS`` or
``_APP_CHECKS``. A check turns a raw value (as ``tomllib`` returns it) into its typed
form, or raises ``_Invalid`` with an "expected ..., got ..." text. The file and the
command line both go through these checks (flags are first turned into the same raw
tables), so an error reads the same wherever the value came from. Relative paths are
made absolute here (against the config file's directory, or the current directory for
flags) because the daemon must not depend on its own working directory.
Nothing here touches the file system except ``load_config`` / ``config_from_run_args``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import signal
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

# sun_path is 108 bytes on Linux, one of which is the terminating NUL.
UNIX_PATH_MAX = 107


class ConfigError(Exception):
    """A configuration problem; ``str(e)`` is the full user-facing message."""


# --- value parsers (public: the CLI and the admin API reuse them) -------------

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:i?B)?|B)?", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Parse ``"30s"``, ``"500ms"``, ``"2m"``, ``"1h"`` or a bare number of seconds.

    Returns seconds; raises ValueError for anything else (negative values included).
    """
    m = _DURATION_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"invalid duration {_q(text)}: expected a number and ms, s, m or h")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def parse_size(text: str) -> int:
    """Parse ``"512MB"``, ``"64KB"``, ``"2MiB"``, ``"64K"`` or a bare byte count into bytes.

    Units are binary (KB = KiB = 1024), as nginx and Passenger use them.
    """
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"invalid size {_q(text)}: expected a number and B, KB, MB, GB or TB")
    exponent = " KMGT".index(m.group(2).upper()) if m.group(2) else 0
    return int(float(m.group(1)) * 1024**exponent)


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One listener: a Unix socket ``path``, or a TCP ``host`` and ``port`` (host "" = all)."""

    kind: Literal["unix", "tcp"]
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


_HOST_RE = re.compile(r"[A-Za-z0-9._-]+")
_LISTEN_FORMS = '"unix:/path", "host:port", "[ipv6]:port" or ":port"'


def _check_unix_path(path: str) -> None:
    size = len(path.encode())
    if size > UNIX_PATH_MAX:
        raise ValueError(
            f"Unix socket paths are limited to {UNIX_PATH_MAX} bytes, got {_q(path)}"
            f" ({size} bytes): use a shorter path"
        )


def parse_listen(text: str) -> ListenAddress:
    """Parse ``"unix:/run/x.sock"``, ``"127.0.0.1:8080"``, ``"[::1]:8080"`` or ``":8080"``.

    Raises ValueError with a message that can be shown to the user as is.
    """
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError(f'expected a socket path after "unix:", got {_q(text)}')
        _check_unix_path(path)
        return ListenAddress("unix", path=path)
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            sep = ""
    else:
        host, sep, port = text.rpartition(":")
        # A bare IPv6 address is ambiguous ("::1:80"), so brackets are required.
        if host and not _HOST_RE.fullmatch(host):
            sep = ""
    if not sep:
        hint = f' (did you mean "unix:{text}"?)' if text.startswith(("/", ".")) else ""
        raise ValueError(f"expected {_LISTEN_FORMS}, got {_q(text)}{hint}")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"expected a port from 1 to 65535, got {_q(port)} in {_q(text)}")
    return ListenAddress("tcp", host=host, port=int(port))


# --- the configuration -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """The ``[daemon]`` table: admin socket, logging and client-side HTTP limits."""

    admin_socket: str = "/run/flypool/admin.sock"
    admin_socket_mode: int = 0o600
    pid_file: str = ""
    log_format: str = "auto"
    log_level: str = "info"
    log_file: str = ""  # log to this file instead of stderr
    access_log: str = ""  # "" = off, "-" = into the daemon's log, else a file (reopened on USR1)
    runtime_dir: str = ""  # worker sockets; "" = $RUNTIME_DIRECTORY or /tmp
    admin_group: str = ""  # members may use the admin socket besides root and the daemon's user
    header_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    body_timeout: float = 60.0
    max_header_size: int = 65536
    send_timeout: float = 60.0  # a client that accepts no response bytes this long is closed
    underscores_in_headers: Literal["drop", "pass", "refuse"] = "drop"
    max_pool_size: int = 256  # most workers of all apps together


@dataclass(frozen=True, slots=True)
class AppConfig:
    """One ``[[app]]``: its root, worker command, listeners and pool/restart policy."""

    name: str
    root: str
    command: tuple[str, ...]
    listen: tuple[ListenAddress, ...]
    listen_mode: int = 0o660
    listen_group: str = ""  # group of Unix listen sockets (e.g. nginx's www-data)
    proxy_protocol: bool = False  # TCP listeners require a PROXY v1/v2 header
    workers: int = 4
    max_workers: int = 0  # > workers: elastic pool (SPEC §10); 0 = fixed
    worker_idle_time: float = 300.0
    preload: tuple[str, ...] = ()  # modules a per-release preloader imports (SPEC §11)
    worker_concurrency: int = 1
    max_queue: int = 100
    queue_timeout: float = 30.0
    worker_bind: str = "unix"
    ready_path: str = ""
    start_timeout: float = 60.0
    drain_timeout: float = 30.0
    stop_signal: int = signal.SIGTERM
    stop_timeout: float = 10.0
    rolling_restarts: bool = True
    restart_batch: int | Literal["auto"] = 1
    memory_reserve: int = 256 * 1024 * 1024
    canary: int = 0
    canary_requests: int = 200
    canary_timeout: float = 600.0
    canary_max_error_rate: float = 0.01  # a fraction: "1%" in the file
    canary_max_latency_ratio: float = 2.0  # 0 = ignore latency
    retry_idempotent: bool = True
    resist_deployment_errors: bool = True
    restart_file: str = "tmp/restart.txt"
    restart_check_interval: float = 1.0
    max_requests: int = 0
    max_request_time: float = 0.0
    memory_limit: int = 0
    health_path: str = ""
    user: str = ""
    group: str = ""
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration; ``path`` is the absolute file path (None in flag mode)."""

    daemon: DaemonConfig
    apps: tuple[AppConfig, ...]
    path: str | None = None


# --- per-key checks ----------------------------------------------------------


class _Invalid(Exception):
    """A raw value failed its check; the text is what follows 'key "x": ' in the message."""


_Check = Callable[[Any], Any]


def _q(value: object) -> str:
    """Show a value the way TOML writes it ("text", true, 3), not like repr()."""
    return json.dumps(value, ensure_ascii=False, default=str)


def _rule(what: str, convert: Callable[[Any], Any]) -> _Check:
    """Make a check from ``convert``, which returns the typed value or None if invalid."""

    def check(value: Any) -> Any:
        result = convert(value)
        if result is None:
            raise _Invalid(f"expected {what}, got {_q(value)}")
        return result

    return check


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but "workers = true" is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _parsed(value: Any, parse: Callable[[str], Any], numbers: Any) -> Any:
    """Parse a string with ``parse``; a bare number (seconds, bytes) is taken as is."""
    if isinstance(value, str):
        try:
            return parse(value)
        except ValueError:
            return None
    return value if isinstance(value, numbers) and not isinstance(value, bool) else None


def _duration(*, zero_ok: bool) -> _Check:
    def convert(value: Any) -> float | None:
        s = _parsed(value, parse_duration, int | float)
        ok = s is not None and math.isfinite(s) and (s > 0 or (zero_ok and s == 0))
        return float(s) if ok else None

    return _rule(f'a duration {">=" if zero_ok else ">"} 0 like "30s", "500ms" or "2m"', convert)


def _size(minimum: int, what: str) -> _Check:
    def convert(value: Any) -> int | None:
        size = _parsed(value, parse_size, int)
        return size if size is not None and size >= minimum else None

    return _rule(what, convert)


def _integer(minimum: int) -> _Check:
    return _rule(f"an integer >= {minimum}", lambda v: v if _is_int(v) and v >= minimum else None)


def _choice(*options: str) -> _Check:
    what = "one of " + ", ".join(map(_q, options))
    return _rule(what, lambda v: v if isinstance(v, str) and v in options else None)


_MODE_RE = re.compile(r"(?:0o|0)?([0-7]{1,3})")


def _to_mode(value: Any) -> int | None:
    if isinstance(value, str) and (m := _MODE_RE.fullmatch(value)):
        return int(m.group(1), 8)
    # An int is taken as is (TOML 0o660); above 0o777 it is almost surely a decimal 660.
    return value if _is_int(value) and 0 <= value <= 0o777 else None


def _to_signal(value: Any) -> signal.Signals | None:
    name = value.strip().upper() if isinstance(value, str) else ""
    return signal.Signals.__members__.get(name if name.startswith("SIG") else "SIG" + name)


def _to_argv(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, list | tuple) and value and all(isinstance(a, str) for a in value):
        return tuple(value) if value[0] else None
    return None


_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def _to_rate(value: Any) -> float | None:
    """``"1%"`` or ``"0.5%"`` → 0.01 / 0.005; a bare number is a fraction from 0 to 1."""
    if isinstance(value, str):
        text = value.strip()
        if not text.endswith("%"):
            return None
        try:
            rate = float(text[:-1]) / 100
        except ValueError:
            return None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        rate = float(value)
    else:
        return None
    return rate if math.isfinite(rate) and 0 <= rate <= 1 else None


def _to_ratio(value: Any) -> float | None:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        ratio = float(value)
        return ratio if math.isfinite(ratio) and (ratio == 0 or ratio >= 1) else None
    return None


_COMMAND_WHAT = 'a list of strings like ["gunicorn", "--bind", "unix:{socket}", "app:app"]'
_LISTEN_WHAT = 'a list of addresses like ["unix:/run/flypool/blog.sock"] or ["127.0.0.1:8080"]'


def _listen(value: Any) -> tuple[ListenAddress, ...]:
    items = [value] if isinstance(value, str) else value
    if (
        not isinstance(items, list | tuple)
        or not items
        or not all(isinstance(i, str) for i in items)
    ):
        raise _Invalid(f"expected {_LISTEN_WHAT}, got {_q(value)}")
    try:
        return tuple(parse_listen(item) for item in items)
    except ValueError as e:
        raise _Invalid(str(e)) from None


def _env(value: Any) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise _Invalid(
            f'expected a table of strings like {{ APP_ENV = "production" }}, got {_q(value)}'
        )
    for key, item in value.items():
        if not isinstance(key, str) or not key or "=" in key or "\0" in key:
            raise _Invalid(f'expected variable names without "=", got {_q(key)}')
        if not isinstance(item, str) or "\0" in item:
            raise _Invalid(f"expected a string for {_q(key)} (quote numbers), got {_q(item)}")
    return MappingProxyType(dict(value))


_STRING = _rule("a string", lambda v: v if isinstance(v, str) else None)
_NONEMPTY = _rule("a non-empty string", lambda v: v if isinstance(v, str) and v else None)
_BOOL = _rule("true or false", lambda v: v if isinstance(v, bool) else None)
_HTTP_PATH = _rule(
    '"" or a path starting with "/"',
    lambda v: v if isinstance(v, str) and v[:1] in ("", "/") else None,
)
_MODE = _rule('an octal permission string like "0660"', _to_mode)
_POSITIVE = _duration(zero_ok=False)

_DAEMON_CHECKS: dict[str, _Check] = {
    "admin_socket": _NONEMPTY,
    "admin_socket_mode": _MODE,
    "pid_file": _STRING,
    "log_format": _choice("auto", "json", "console"),
    "log_level": _choice("debug", "info", "warning", "error", "critical"),
    "log_file": _STRING,
    "access_log": _rule(
        'a file path, "-" (the daemon\'s own log) or "" (off)',
        # true/false were the first spelling: true = into the daemon's log.
        lambda v: ("-" if v else "") if isinstance(v, bool) else v if isinstance(v, str) else None,
    ),
    "runtime_dir": _STRING,
    "admin_group": _STRING,
    "header_timeout": _POSITIVE,
    "keepalive_timeout": _POSITIVE,
    "body_timeout": _POSITIVE,
    "max_header_size": _size(1024, 'a size of at least 1KB like "64KB"'),
    "send_timeout": _POSITIVE,
    "underscores_in_headers": _choice("drop", "pass", "refuse"),
    "max_pool_size": _integer(1),
}

_APP_CHECKS: dict[str, _Check] = {
    "name": _rule(
        'a name of letters, digits, "_", "." and "-" like "blog"',
        lambda v: v if isinstance(v, str) and _NAME_RE.fullmatch(v) else None,
    ),
    "root": _NONEMPTY,
    "command": _rule(_COMMAND_WHAT, _to_argv),
    "listen": _listen,
    "listen_mode": _MODE,
    "listen_group": _STRING,
    "proxy_protocol": _BOOL,
    "workers": _integer(1),
    "max_workers": _integer(0),
    "worker_idle_time": _POSITIVE,
    "preload": _rule(
        'a list of Python module names like ["myapp.wsgi"]',
        lambda v: (
            tuple(v)
            if isinstance(v, list | tuple)
            and all(isinstance(m, str) and _MODULE_RE.fullmatch(m) for m in v)
            else None
        ),
    ),
    "worker_concurrency": _integer(0),
    "max_queue": _integer(0),
    "queue_timeout": _POSITIVE,
    "worker_bind": _choice("unix", "tcp"),
    "ready_path": _HTTP_PATH,
    "start_timeout": _POSITIVE,
    "drain_timeout": _POSITIVE,
    "stop_signal": _rule('a signal name like "SIGTERM" or "QUIT"', _to_signal),
    "stop_timeout": _POSITIVE,
    "rolling_restarts": _BOOL,
    "restart_batch": _rule(
        'an integer >= 1 or "auto"',
        lambda v: v if v == "auto" or (_is_int(v) and v >= 1) else None,
    ),
    "memory_reserve": _size(0, 'a size like "256MB" or a number of bytes'),
    "canary": _integer(0),
    "canary_requests": _integer(1),
    "canary_timeout": _POSITIVE,
    "canary_max_error_rate": _rule('a percentage like "1%" (or a fraction like 0.01)', _to_rate),
    "canary_max_latency_ratio": _rule("a number >= 0 like 2.0 (0 = ignore latency)", _to_ratio),
    "retry_idempotent": _BOOL,
    "resist_deployment_errors": _BOOL,
    "restart_file": _STRING,
    "restart_check_interval": _POSITIVE,
    "max_requests": _integer(0),
    "max_request_time": _duration(zero_ok=True),
    "memory_limit": _size(0, 'a size like "512MB" or a number of bytes'),
    "health_path": _HTTP_PATH,
    "user": _STRING,
    "group": _STRING,
    "env": _env,
}

_REQUIRED_APP_KEYS = {
    "name": 'a name like "blog"',
    "root": 'the app directory like "/srv/blog/current"',
    "command": _COMMAND_WHAT,
    "listen": _LISTEN_WHAT,
}
_DAEMON_PATH_KEYS = ("admin_socket", "pid_file", "log_file", "runtime_dir", "access_log")


# --- validation core ---------------------------------------------------------


def _absolute(path: str, base_dir: str) -> str:
    """Resolve a relative path against ``base_dir``; "" (unset) stays "".

    Absolute paths are left alone: normalising them could step out of a symlink.
    """
    if not path or path == "-" or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(base_dir, path))


def _absolute_listen(addr: ListenAddress, base_dir: str) -> ListenAddress:
    # "@name" is Linux's abstract namespace, not a file.
    if addr.kind != "unix" or addr.path.startswith("@"):
        return addr
    path = _absolute(addr.path, base_dir)
    _check_unix_path(path)
    return dataclasses.replace(addr, path=path)


def _unknown(key: object, known: Mapping[str, object] | tuple[str, ...], where: str) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    hint = f"did you mean {_q(close[0])}? " if close else ""
    return f"unknown key {_q(key)} in {where} ({hint}known keys: {', '.join(sorted(known))})"


def _check_table(
    raw: Mapping[str, Any], checks: Mapping[str, _Check], head: str, where: str, source: str
) -> dict[str, Any]:
    """Run each key of one table through its check; unknown keys are errors."""
    for key in raw:
        if key not in checks:
            raise ConfigError(f"{source}: {_unknown(key, checks, where)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            values[key] = checks[key](value)
        except _Invalid as e:
            raise ConfigError(f'{head}key "{key}": {e}') from None
    return values


def _build_app(
    raw: Mapping[str, Any], index: int, source: str, base_dir: str, label: bool
) -> AppConfig:
    name = raw.get("name")
    ident = _q(name) if isinstance(name, str) and name else f"#{index}"
    head = f"{source}: app {ident}: " if label else f"{source}: "
    values = _check_table(raw, _APP_CHECKS, head, f"[[app]] {ident}", source)
    for key, what in _REQUIRED_APP_KEYS.items():
        if key not in values:
            raise ConfigError(f'{head}key "{key}" is required: expected {what}')
    # root is not checked for existence: a release may only appear after the daemon starts.
    values["root"] = _absolute(values["root"], base_dir)
    try:
        values["listen"] = tuple(_absolute_listen(a, base_dir) for a in values["listen"])
    except ValueError as e:
        raise ConfigError(f'{head}key "listen": {e}') from None
    # The worker is told where to bind through one placeholder; the other one would stay
    # a literal "{port}" in its argv and the worker would never become ready.
    bind = values.get("worker_bind", "unix")
    wrong, right = ("{port}", "{socket}") if bind == "unix" else ("{socket}", "{port}")
    for arg in values["command"]:
        if wrong in arg:
            other = "tcp" if bind == "unix" else "unix"
            raise ConfigError(
                f'{head}key "command": expected "{right}" with worker_bind = "{bind}", '
                f'got {_q(arg)} (set worker_bind = "{other}" to use "{wrong}")'
            )
    workers = values.get("workers", 4)
    max_workers = values.get("max_workers", 0)
    if max_workers and max_workers < workers:
        raise ConfigError(
            f'{head}key "max_workers": expected 0 (a fixed pool) or at least workers '
            f"({workers}), got {max_workers}"
        )
    return AppConfig(**values)


def _clash(a: ListenAddress, b: ListenAddress) -> bool:
    """Whether binding both would fail: same address, or a TCP wildcard on the same port."""
    if a.kind != b.kind:
        return False
    if a.kind == "unix":
        return a.path == b.path
    wildcard = ("", "0.0.0.0", "::")
    return a.port == b.port and (a.host == b.host or a.host in wildcard or b.host in wildcard)


def _build(data: Mapping[str, Any], source: str, base_dir: str, *, label: bool = True) -> Config:
    for key in data:
        if key not in ("daemon", "app"):
            raise ConfigError(f"{source}: {_unknown(key, ('daemon', 'app'), 'the top level')}")
    raw_daemon = data.get("daemon", {})
    if not isinstance(raw_daemon, Mapping):
        raise ConfigError(f'{source}: key "daemon": expected a table, got {_q(raw_daemon)}')
    head = f"{source}: [daemon] " if label else f"{source}: "
    values = _check_table(raw_daemon, _DAEMON_CHECKS, head, "[daemon]", source)
    for key in _DAEMON_PATH_KEYS:
        if key in values:
            values[key] = _absolute(values[key], base_dir)
    daemon = DaemonConfig(**values)
    try:
        _check_unix_path(daemon.admin_socket)
    except ValueError as e:
        raise ConfigError(f'{head}key "admin_socket": {e}') from None

    raw_apps = data.get("app", [])
    if not isinstance(raw_apps, list) or not all(isinstance(a, Mapping) for a in raw_apps):
        raise ConfigError(
            f'{source}: key "app": expected an array of tables ([[app]]), got {_q(raw_apps)}'
        )
    if not raw_apps:
        raise ConfigError(f"{source}: no [[app]] table: expected at least one app")
    apps = tuple(_build_app(raw, i, source, base_dir, label) for i, raw in enumerate(raw_apps, 1))

    # Cross-app checks: each would otherwise fail at bind time, after other apps started.
    owners = [(ListenAddress("unix", path=daemon.admin_socket), "[daemon] admin_socket")]
    names: set[str] = set()
    for app in apps:
        head = f"{source}: app {_q(app.name)}: " if label else f"{source}: "
        if app.name in names:
            raise ConfigError(f'{head}key "name": expected a unique name, got {_q(app.name)} twice')
        names.add(app.name)
        for addr in app.listen:
            for other, owner in owners:
                if _clash(addr, other):
                    how = "twice" if addr == other else f"clashing with {_q(str(other))}"
                    raise ConfigError(
                        f'{head}key "listen": expected each address once, '
                        f"got {_q(str(addr))} {how} (also used by {owner})"
                    )
            owners.append((addr, f"app {_q(app.name)}"))
    total = sum(max(a.workers, a.max_workers) for a in apps)
    if total > daemon.max_pool_size:
        head = f"{source}: [daemon] " if label else f"{source}: "
        raise ConfigError(
            f'{head}key "max_pool_size": expected at least the workers of all apps '
            f"together ({total}, counting max_workers), got {daemon.max_pool_size}"
        )
    return Config(daemon=daemon, apps=apps)


def config_from_dict(
    data: Mapping[str, Any], source: str, *, base_dir: str | None = None
) -> Config:
    """Validate a parsed TOML document; ``source`` names it in error messages.

    Relative paths are resolved against ``base_dir`` (default: the current directory).
    The returned Config has ``path=None``; ``load_config`` fills it in.
    """
    return _build(data, source, os.getcwd() if base_dir is None else base_dir)


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: invalid TOML: the file is not UTF-8") from None
    except OSError as e:
        reason = f"[Errno {e.errno}] {e.strerror}" if e.strerror else str(e)
        raise ConfigError(f"{path}: cannot read file: {reason}") from None


def load_config(path: str) -> Config:
    """Read and validate a TOML config file; raises ConfigError."""
    config = _build(_read_toml(path), path, os.path.dirname(os.path.abspath(path)))
    return dataclasses.replace(config, path=os.path.abspath(path))


# --- single-app mode: `flypool run` flags -----------------------------------

_HELP = {
    "name": "app name (default: app)",
    "root": "app directory (default: the current directory)",
    "listen": "front address, e.g. unix:./app.sock or 127.0.0.1:8080 (repeatable)",
    "env": "extra worker environment variable KEY=VALUE (repeatable)",
    "workers": "worker processes to keep alive",
    "worker_bind": "unix or tcp: fills {socket} or {port} in the command",
}
_INT_KEYS = frozenset(
    {
        "workers",
        "worker_concurrency",
        "max_queue",
        "restart_batch",
        "max_requests",
        "max_workers",
        "max_pool_size",
        "canary",
        "canary_requests",
    }
)
_BOOL_KEYS = frozenset(
    {
        "rolling_restarts",
        "resist_deployment_errors",
        "proxy_protocol",
        "retry_idempotent",
    }
)


def _metavar(key: str) -> str:
    if key in _INT_KEYS:
        return "N"
    if key.endswith(("_timeout", "_interval", "_time")):
        return "DURATION"
    if key in ("memory_limit", "max_header_size", "memory_reserve"):
        return "SIZE"
    return "MODE" if key.endswith("_mode") else key.upper()


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``-c/--config``, one flag per config key and the positional worker command.

    Every default is None, so ``config_from_run_args`` can tell "not given" apart.
    """
    parser.add_argument("-c", "--config", metavar="FILE", help="read this TOML config file")
    for key in (*_APP_CHECKS, *_DAEMON_CHECKS):
        if key == "command":
            continue
        kwargs: dict[str, Any] = {"help": _HELP.get(key, f"the {key} config key")}
        if key in _BOOL_KEYS:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif key in ("listen", "env", "preload"):
            metavar = {"env": "KEY=VALUE", "listen": "ADDRESS", "preload": "MODULE"}[key]
            kwargs.update(action="append", metavar=metavar)
        else:
            kwargs["metavar"] = _metavar(key)
        parser.add_argument("--" + key.replace("_", "-"), default=None, **kwargs)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the worker command, after --")


def _flag_tables(ns: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """Turn the given flags into raw [daemon] and [[app]] tables, each value checked."""
    cwd = os.getcwd()
    daemon: dict[str, Any] = {}
    app: dict[str, Any] = {}
    for key in (*_DAEMON_CHECKS, *_APP_CHECKS):
        value: Any = getattr(ns, key, None) if key != "command" else None
        if value is None:
            continue
        if key == "env":
            pairs = [item.partition("=") for item in value]
            for item, (name, sep, _) in zip(value, pairs, strict=True):
                if not sep or not name:
                    raise ConfigError(
                        f'command line: key "env": expected KEY=VALUE, got {_q(item)}'
                    )
            value = {name: text for name, _, text in pairs}
        elif key in _INT_KEYS and re.fullmatch(r"[+-]?\d+", value):
            value = int(value)  # flags are strings; the TOML path stays strict about types
        table = _DAEMON_CHECKS if key in _DAEMON_CHECKS else _APP_CHECKS
        try:
            checked = table[key](value)
            # Relative paths on the command line mean "from where I typed it".
            if key == "listen":
                value = [str(_absolute_listen(addr, cwd)) for addr in checked]
            elif key in (*_DAEMON_PATH_KEYS, "root"):
                value = _absolute(value, cwd)
        except (_Invalid, ValueError) as e:
            raise ConfigError(f'command line: key "{key}": {e}') from None
        (daemon if table is _DAEMON_CHECKS else app)[key] = value
    command = list(getattr(ns, "command", None) or [])
    if command[:1] == ["--"]:
        command = command[1:]
    if command:
        app["command"] = command
    return daemon, app


def config_from_run_args(ns: argparse.Namespace) -> Config:
    """Build the Config for ``flypool run`` from flags parsed by ``add_run_arguments``.

    With ``-c FILE`` the file is loaded and flags override its keys (app flags only when
    it has exactly one app); without it one app is built from the flags alone.
    """
    daemon, app = _flag_tables(ns)
    path: str | None = getattr(ns, "config", None)
    if path is None:
        if "command" not in app:
            raise ConfigError(
                "command line: no command: give one after --, e.g. flypool run "
                "--listen unix:./app.sock -- gunicorn --bind unix:{socket} app:app"
            )
        if "listen" not in app:
            raise ConfigError(
                'command line: key "listen" is required: expected --listen ADDRESS, '
                "e.g. --listen unix:./app.sock or --listen 127.0.0.1:8080"
            )
        app.setdefault("name", "app")
        app.setdefault("root", os.getcwd())
        return _build({"daemon": daemon, "app": [app]}, "command line", os.getcwd(), label=False)

    data = _read_toml(path)
    if daemon and isinstance(data.get("daemon", {}), Mapping):
        data["daemon"] = {**data.get("daemon", {}), **daemon}
    if app:
        apps = data.get("app")
        count = len(apps) if isinstance(apps, list) else 0
        if count != 1 or not isinstance(apps, list) or not isinstance(apps[0], Mapping):
            given = ", ".join("--" + k.replace("_", "-") for k in app if k != "command")
            raise ConfigError(
                f"command line: app flags ({given or 'a command'}) can only override an app "
                f"when {path} has exactly one [[app]], it has {count}"
            )
        if "env" in app and isinstance(apps[0].get("env"), Mapping):
            app["env"] = {**apps[0]["env"], **app["env"]}  # --env adds to the file's table
        data["app"] = [{**apps[0], **app}]
    config = _build(data, path, os.path.dirname(os.path.abspath(path)))
    return dataclasses.replace(config, path=os.path.abspath(path))
