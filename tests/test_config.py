"""Tests for `flypool.config`: the TOML file and `flypool run` flags of SPEC §3."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from flypool import config as config_module
from flypool.config import (
    AppConfig,
    Config,
    ConfigError,
    DaemonConfig,
    ListenAddress,
    add_run_arguments,
    config_from_dict,
    config_from_run_args,
    load_config,
    parse_duration,
    parse_listen,
    parse_size,
)

# Copied verbatim from SPEC.md §3: the documented example must always load.
SPEC_EXAMPLE = """
[daemon]
admin_socket = "/run/flypool/admin.sock"   # control + status + metrics
admin_socket_mode = "0600"
pid_file = ""                               # optional
log_format = "auto"                         # auto | json | console
log_level = "info"
header_timeout = "30s"                      # a client must send its request head within this
keepalive_timeout = "75s"                   # idle keep-alive client connections are closed after this
body_timeout = "60s"                        # no request-body bytes for this long → 408 and close
max_header_size = "64KB"                    # request line + headers; larger → 431
send_timeout = "60s"                        # a client that accepts no response bytes for this long is
                                            # closed and its worker slot freed (nginx send_timeout)
underscores_in_headers = "drop"             # drop | pass | refuse (400): header names with "_"
                                            # (WSGI/CGI servers fold them into the dashed name)
log_file = ""                               # optional; reopened on USR1
access_log = ""                             # optional
runtime_dir = ""                            # where worker sockets live
admin_group = ""                            # members may use the admin socket
max_pool_size = 256                         # most workers of all apps together; scale, TTIN or
                                            # max_workers beyond it are refused (400 / logged)

[[app]]
name = "blog"
root = "/srv/blog/current"                  # may be a symlink; re-resolved at every spawn
command = ["gunicorn", "--bind", "unix:{socket}", "--workers", "1", "app:app"]
listen = ["unix:/run/flypool/blog.sock"]    # or "127.0.0.1:8080"
listen_mode = "0660"
listen_group = ""                           # e.g. "www-data", so nginx reaches a 0660 socket
proxy_protocol = false                      # TCP listeners expect a PROXY v1/v2 header (HAProxy send-proxy)
workers = 4                                 # processes kept alive (the floor when max_workers is set)
max_workers = 0                             # > workers: grow on queueing, shrink back when idle (§10); 0 = fixed
worker_idle_time = "5m"                     # an extra worker idle this long is drained and stopped
preload = []                                # Python modules a per-release preloader imports once;
                                            # workers are then forked from it (§11); [] = cold spawn
worker_concurrency = 1                      # in-flight requests per worker; 0 = unlimited
max_queue = 100                             # requests waiting for a free worker; overflow → 503
queue_timeout = "30s"                       # waiting longer → 504
worker_bind = "unix"                        # unix | tcp
ready_path = ""                             # optional HTTP readiness probe
start_timeout = "60s"
drain_timeout = "30s"
stop_signal = "SIGTERM"
stop_timeout = "10s"
rolling_restarts = true
restart_batch = 1                           # extra workers during a rolling restart; "auto" = by memory (§7)
memory_reserve = "256MB"                    # headroom "auto" leaves untouched
canary = 0                                  # new workers that must prove the release first (§7); 0 = none
canary_requests = 200                       # requests the canary must serve before promotion
canary_timeout = "10m"                      # no decision by then → roll back
canary_max_error_rate = "1%"                # above this AND above the old generation's (§7) → roll back
canary_max_latency_ratio = 2.0              # canary p99 / old p99 above this → roll back; 0 = ignore latency
retry_idempotent = true                     # §6
resist_deployment_errors = true
restart_file = "tmp/restart.txt"            # under root, resolved at every check; appears or mtime changes → restart
restart_check_interval = "1s"
max_requests = 0                            # recycle a worker after N requests; 0 = never
max_request_time = "0s"                     # from the moment a worker took the request (queue wait and
                                            # upload excluded); longer → 504 and the worker is replaced; 0 = never
memory_limit = "0"                          # RSS over this → graceful replace; 0 = none
health_path = ""                            # e.g. "/_flypool/health": answered by the daemon on
                                            # the front listener, 200 serving / 503 drained or no worker
user = ""                                   # when the daemon runs as root: run workers as this user;
                                            # as root with no user the app refuses to start (exit 2)
                                            # unless user = "root" is written
group = ""
env = { APP_ENV = "production" }
"""  # noqa: E501 (kept verbatim from the SPEC, comments included)

MINIMAL_APP = """
[[app]]
name = "blog"
root = "/srv/blog"
command = ["gunicorn", "--bind", "unix:{socket}", "app:app"]
listen = ["unix:/run/flypool/blog.sock"]
"""


def _app(**overrides: Any) -> dict[str, Any]:
    app: dict[str, Any] = {
        "name": "blog",
        "root": "/srv/blog",
        "command": ["gunicorn", "--bind", "unix:{socket}", "app:app"],
        "listen": ["unix:/run/flypool/blog.sock"],
    }
    app.update(overrides)
    return app


def _write(tmp_path: Path, text: str, name: str = "flypool.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _dict_error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, "flypool.toml")
    return str(info.value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser


def _run(*argv: str) -> Config:
    return config_from_run_args(_parser().parse_args(list(argv)))


def _run_error(*argv: str) -> str:
    with pytest.raises(ConfigError) as info:
        _run(*argv)
    return str(info.value)


# --- the SPEC example and defaults -------------------------------------------


def test_spec_example_loads_with_documented_values(tmp_path: Path) -> None:
    """The §3 example parses, and every value comes out typed as documented."""
    path = _write(tmp_path, SPEC_EXAMPLE)
    config = load_config(path)
    assert config.path == os.path.abspath(path)
    assert config.daemon == DaemonConfig(
        admin_socket="/run/flypool/admin.sock",
        admin_socket_mode=0o600,
        header_timeout=30.0,
        keepalive_timeout=75.0,
        body_timeout=60.0,
        max_header_size=64 * 1024,
        send_timeout=60.0,
        underscores_in_headers="drop",
        max_pool_size=256,
    )
    (app,) = config.apps
    assert app.name == "blog"
    assert app.root == "/srv/blog/current"
    assert app.command == ("gunicorn", "--bind", "unix:{socket}", "--workers", "1", "app:app")
    assert app.listen == (ListenAddress("unix", path="/run/flypool/blog.sock"),)
    assert app.listen_mode == 0o660
    assert (app.workers, app.worker_concurrency, app.max_queue) == (4, 1, 100)
    assert (app.queue_timeout, app.start_timeout, app.drain_timeout) == (30.0, 60.0, 30.0)
    assert app.stop_signal == signal.SIGTERM
    assert app.stop_timeout == 10.0
    assert app.rolling_restarts is True
    assert app.resist_deployment_errors is True
    assert app.restart_batch == 1
    assert app.restart_file == "tmp/restart.txt"
    assert app.restart_check_interval == 1.0
    assert (app.max_requests, app.max_request_time, app.memory_limit) == (0, 0.0, 0)
    assert (app.ready_path, app.health_path, app.user, app.group) == ("", "", "", "")
    assert dict(app.env) == {"APP_ENV": "production"}
    assert (app.proxy_protocol, app.max_workers, app.worker_idle_time) == (False, 0, 300.0)
    assert (app.preload, app.memory_reserve) == ((), 256 * 1024 * 1024)
    assert (app.canary, app.canary_requests, app.canary_timeout) == (0, 200, 600.0)
    assert (app.canary_max_error_rate, app.canary_max_latency_ratio) == (0.01, 2.0)
    assert app.retry_idempotent is True


def test_spec_example_equals_the_defaults(tmp_path: Path) -> None:
    """The example spells out the defaults, so a minimal file gives the same app."""
    example = load_config(_write(tmp_path, SPEC_EXAMPLE)).apps[0]
    minimal = load_config(_write(tmp_path, MINIMAL_APP, "min.toml")).apps[0]
    differing = {
        f.name
        for f in dataclasses.fields(AppConfig)
        if getattr(example, f.name) != getattr(minimal, f.name)
    }
    assert differing == {"root", "command", "env"}


def test_check_tables_cover_every_dataclass_field() -> None:
    """Every field has exactly one check, so no key is silently unsettable."""
    assert set(config_module._APP_CHECKS) == {f.name for f in dataclasses.fields(AppConfig)}
    assert set(config_module._DAEMON_CHECKS) == {f.name for f in dataclasses.fields(DaemonConfig)}


def test_config_is_immutable(tmp_path: Path) -> None:
    """A loaded config cannot be changed by accident, env included."""
    config = load_config(_write(tmp_path, SPEC_EXAMPLE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.apps[0].workers = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.apps[0].env["X"] = "1"  # type: ignore[index]


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    """root, unix listen paths and daemon paths are relative to the file, not the cwd."""
    text = MINIMAL_APP.replace('"/srv/blog"', '"app"').replace("/run/flypool/blog.sock", "b.sock")
    text = '[daemon]\nadmin_socket = "run/admin.sock"\npid_file = "flypool.pid"\n' + text
    config = load_config(_write(tmp_path, text))
    assert config.apps[0].root == str(tmp_path / "app")
    assert config.apps[0].listen[0].path == str(tmp_path / "b.sock")
    assert config.daemon.admin_socket == str(tmp_path / "run" / "admin.sock")
    assert config.daemon.pid_file == str(tmp_path / "flypool.pid")


def test_accepted_alternative_spellings() -> None:
    """Bare numbers for durations/sizes, int modes, short signal names, one listen string."""
    config = config_from_dict(
        {
            "daemon": {"admin_socket_mode": 0o640, "header_timeout": 5, "max_header_size": 8192},
            "app": [
                _app(
                    listen="127.0.0.1:8080",
                    worker_bind="tcp",
                    command=["app", "--port", "{port}"],
                    stop_signal="quit",
                    queue_timeout=1.5,
                    memory_limit="512MB",
                    listen_mode="660",
                )
            ],
        },
        "flypool.toml",
    )
    assert config.daemon.admin_socket_mode == 0o640
    assert config.daemon.header_timeout == 5.0
    assert config.daemon.max_header_size == 8192
    app = config.apps[0]
    assert app.listen == (ListenAddress("tcp", host="127.0.0.1", port=8080),)
    assert app.stop_signal == signal.SIGQUIT
    assert app.queue_timeout == 1.5
    assert app.memory_limit == 512 * 1024**2
    assert app.listen_mode == 0o660


# --- value parsers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("1.5s", 1.5),
        ("10", 10.0),
        (" 3s ", 3.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """Durations use ms/s/m/h; a bare number is seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "s", "30x", "-1s", "1e3", "inf", "nan", "3 s", "1m30s", "30S"]
)
def test_parse_duration_rejects(text: str) -> None:
    """Anything else is a ValueError, including negative and exotic numbers."""
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MB", 512 * 1024**2),
        ("64KB", 64 * 1024),
        ("1GB", 1024**3),
        ("1024", 1024),
        ("0", 0),
        ("2MiB", 2 * 1024**2),
        ("64K", 64 * 1024),
        ("64kb", 64 * 1024),
        ("10B", 10),
        ("1.5KB", 1536),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    """Sizes are binary (KB = KiB = 1024) and accept a bare byte count."""
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MB", "lots", "-1", "5PB", "1 2KB", "0x10"])
def test_parse_size_rejects(text: str) -> None:
    """Anything else is a ValueError."""
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("unix:/run/x.sock", ListenAddress("unix", path="/run/x.sock")),
        ("127.0.0.1:8080", ListenAddress("tcp", host="127.0.0.1", port=8080)),
        ("[::1]:8080", ListenAddress("tcp", host="::1", port=8080)),
        ("localhost:80", ListenAddress("tcp", host="localhost", port=80)),
        (":8080", ListenAddress("tcp", host="", port=8080)),
    ],
)
def test_parse_listen_round_trips(text: str, address: ListenAddress) -> None:
    """Each listen form parses, and str() gives the same text back."""
    assert parse_listen(text) == address
    assert str(address) == text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("unix:", "socket path"),
        ("::1:80", '"[ipv6]:port"'),
        ("/run/x.sock", 'did you mean "unix:/run/x.sock"?'),
        ("localhost", '"host:port"'),
        ("[nope]:80", '"[ipv6]:port"'),
        ("a:0", "port from 1 to 65535"),
        ("a:65536", "port from 1 to 65535"),
        ("a:http", "port from 1 to 65535"),
        ("unix:/" + "x" * 107, "Unix socket paths are limited to 107 bytes"),
    ],
)
def test_parse_listen_rejects(text: str, fragment: str) -> None:
    """Bad addresses are ValueErrors that say what was expected."""
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_listen(text)


def test_parse_listen_path_limit_counts_bytes() -> None:
    """The 107-byte limit is on the encoded path, so non-ASCII counts double."""
    assert parse_listen("unix:/" + "x" * 106).path == "/" + "x" * 106
    with pytest.raises(ValueError, match="107 bytes"):
        parse_listen("unix:/" + "é" * 54)


# --- errors ------------------------------------------------------------------


def test_error_message_format(tmp_path: Path) -> None:
    """An error names the file, the app, the key, the expectation and the bad value."""
    path = _write(tmp_path, MINIMAL_APP + 'workers = "four"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f'{path}: app "blog": key "workers": expected an integer >= 1, got "four"'
    )


@pytest.mark.parametrize(
    ("daemon", "app", "fragments"),
    [
        ({}, {"wokers": 4}, ['unknown key "wokers" in [[app]] "blog"', 'did you mean "workers"?']),
        ({"log_levl": "info"}, {}, ['unknown key "log_levl" in [daemon]', '"log_level"']),
        ({}, {"workers": "four"}, ['key "workers"', "expected an integer >= 1", 'got "four"']),
        ({}, {"workers": True}, ['key "workers"', "expected an integer >= 1", "got true"]),
        ({}, {"workers": 0}, ['key "workers"', "expected an integer >= 1", "got 0"]),
        ({}, {"max_queue": -1}, ['key "max_queue"', "expected an integer >= 0"]),
        ({}, {"rolling_restarts": 1}, ['key "rolling_restarts"', "expected true or false"]),
        ({}, {"queue_timeout": "30 sec"}, ['key "queue_timeout"', "expected a duration > 0"]),
        ({}, {"stop_timeout": "0s"}, ['key "stop_timeout"', "expected a duration > 0"]),
        ({}, {"max_request_time": "-1s"}, ['key "max_request_time"', "expected a duration >= 0"]),
        ({}, {"start_timeout": True}, ['key "start_timeout"', "expected a duration", "got true"]),
        ({}, {"memory_limit": "lots"}, ['key "memory_limit"', 'expected a size like "512MB"']),
        ({"max_header_size": 100}, {}, ["[daemon]", 'key "max_header_size"', "at least 1KB"]),
        ({}, {"listen_mode": "0999"}, ['key "listen_mode"', "expected an octal permission"]),
        ({}, {"listen_mode": 660}, ['key "listen_mode"', "expected an octal permission"]),
        ({}, {"env": {"PORT": 8080}}, ['key "env"', 'expected a string for "PORT"', "got 8080"]),
        ({}, {"env": "A=1"}, ['key "env"', "expected a table of strings"]),
        ({"log_format": "xml"}, {}, ['key "log_format"', 'one of "auto", "json", "console"']),
        ({"log_level": "loud"}, {}, ['key "log_level"', '"critical"', 'got "loud"']),
        ({}, {"ready_path": "ready"}, ['key "ready_path"', 'a path starting with "/"']),
        ({}, {"stop_signal": "SIGNOPE"}, ['key "stop_signal"', "expected a signal name"]),
        ({}, {"worker_bind": "udp"}, ['key "worker_bind"', 'one of "unix", "tcp"']),
        ({}, {"name": "my blog"}, ['key "name"', "expected a name of letters"]),
        ({}, {"root": ""}, ['key "root"', "expected a non-empty string"]),
        ({}, {"command": "gunicorn app:app"}, ['key "command"', "expected a list of strings"]),
        ({}, {"command": []}, ['key "command"', "expected a list of strings", "got []"]),
        ({}, {"command": ["a", 1]}, ['key "command"', "expected a list of strings"]),
        ({}, {"listen": []}, ['key "listen"', "expected a list of addresses"]),
        ({}, {"listen": ["bogus"]}, ['key "listen"', 'expected "unix:/path"', '"bogus"']),
        (
            {},
            {"listen": ["unix:/" + "x" * 120]},
            ['key "listen"', "Unix socket paths are limited to 107 bytes"],
        ),
        (
            {},
            {"command": ["app", "--port", "{port}"]},
            ['key "command"', 'expected "{socket}"', 'worker_bind = "tcp"'],
        ),
        (
            {},
            {"worker_bind": "tcp"},
            ['key "command"', 'expected "{port}" with worker_bind = "tcp"'],
        ),
        (
            {"admin_socket": "/run/flypool/blog.sock"},
            {},
            ['key "listen"', "expected each address once", "[daemon] admin_socket"],
        ),
    ],
)
def test_value_errors(daemon: dict[str, Any], app: dict[str, Any], fragments: list[str]) -> None:
    """Each bad value is reported with the file, the key and what was expected."""
    message = _dict_error({"daemon": daemon, "app": [_app(**app)]})
    assert message.startswith("flypool.toml: ")
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("key", ["name", "root", "command", "listen"])
def test_missing_required_app_key(key: str) -> None:
    """A missing required key says which, and gives an example of what goes there."""
    app = _app()
    del app[key]
    message = _dict_error({"app": [app]})
    assert f'key "{key}" is required: expected ' in message
    # Without a name the app is identified by its position.
    assert ("app #1" if key == "name" else 'app "blog"') in message


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({}, ["no [[app]] table", "at least one app"]),
        ({"app": []}, ["no [[app]] table"]),
        ({"app": _app()}, ['key "app"', "expected an array of tables ([[app]])"]),
        ({"apps": [_app()]}, ['unknown key "apps" in the top level', 'did you mean "app"?']),
        ({"daemon": "x", "app": [_app()]}, ['key "daemon"', "expected a table"]),
        (
            {"app": [_app(), _app(listen=["unix:/run/other.sock"])]},
            ['key "name"', "expected a unique name", '"blog"'],
        ),
        (
            {"app": [_app(), _app(name="shop")]},
            ['app "shop"', 'key "listen"', "expected each address once", "twice"],
        ),
        (
            {"app": [_app(listen=[":8080"]), _app(name="shop", listen=["127.0.0.1:8080"])]},
            ['app "shop"', 'key "listen"', 'clashing with ":8080"', 'app "blog"'],
        ),
    ],
)
def test_structure_errors(data: dict[str, Any], fragments: list[str]) -> None:
    """Top-level shape, unique names and unique listeners are checked across apps."""
    message = _dict_error(data)
    for fragment in fragments:
        assert fragment in message


def test_errors_in_a_file_name_the_file(tmp_path: Path) -> None:
    """Through load_config the message starts with the path as given."""
    path = _write(tmp_path, "[daemon]\nbody_timeout = true\n" + MINIMAL_APP)
    with pytest.raises(ConfigError, match=r'\[daemon\] key "body_timeout": expected a duration'):
        load_config(path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError, not an OSError."""
    path = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read file: [Errno 2] No such file or directory"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    """Giving a directory is reported as unreadable."""
    with pytest.raises(ConfigError, match=r"cannot read file: .*Is a directory"):
        load_config(str(tmp_path))


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file without read permission is reported with the OS reason (also when run as root)."""

    def deny(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    path = _write(tmp_path, MINIMAL_APP)
    monkeypatch.setattr(config_module, "open", deny, raising=False)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read file: [Errno 13] Permission denied"


def test_toml_syntax_error(tmp_path: Path) -> None:
    """A TOML syntax error keeps tomllib's line and column."""
    path = _write(tmp_path, MINIMAL_APP + "workers = \n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: invalid TOML: ")
    assert "line 7" in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    """A binary file is invalid TOML, not a crash."""
    path = tmp_path / "flypool.toml"
    path.write_bytes(b"name = '\xff'\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(str(path))


# --- single-app mode: flags --------------------------------------------------


def test_every_flag_defaults_to_none() -> None:
    """Nothing given means None everywhere, so defaults come from the dataclasses only."""
    ns = vars(_parser().parse_args([]))
    assert ns.pop("command") == []
    assert set(ns.values()) == {None}
    keys = {*config_module._APP_CHECKS, *config_module._DAEMON_CHECKS} - {"command"}
    assert set(ns) == keys | {"config"}


def test_flag_mode_builds_one_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without -c the flags and the command after -- make one app named "app"."""
    monkeypatch.chdir(tmp_path)
    config = _run(
        "--listen", "unix:./a.sock", "--workers", "2", "--queue-timeout", "5s",
        "--stop-signal", "INT", "--no-rolling-restarts", "--env", "A=1", "--env", "B=x=y",
        "--memory-limit", "1GB", "--access-log", "-",
        "--", "python", "-m", "flypool.example", "--socket", "{socket}",
    )  # fmt: skip
    assert config.path is None
    assert config.daemon.admin_socket == "/run/flypool/admin.sock"
    assert config.daemon.access_log == "-"
    (app,) = config.apps
    assert app.name == "app"
    assert app.root == str(tmp_path)
    assert app.command == ("python", "-m", "flypool.example", "--socket", "{socket}")
    assert app.listen == (ListenAddress("unix", path=str(tmp_path / "a.sock")),)
    assert app.workers == 2
    assert app.queue_timeout == 5.0
    assert app.stop_signal == signal.SIGINT
    assert app.rolling_restarts is False
    assert dict(app.env) == {"A": "1", "B": "x=y"}
    assert app.memory_limit == 1024**3


def test_flag_mode_without_double_dash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command may also follow the flags directly; its own flags stay in it."""
    monkeypatch.chdir(tmp_path)
    config = _run("--listen", ":8080", "--worker-bind", "tcp", "app", "--port", "{port}")
    assert config.apps[0].command == ("app", "--port", "{port}")
    assert config.apps[0].listen == (ListenAddress("tcp", port=8080),)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--listen", ":80", "--workers", "x", "--", "a"],
            'command line: key "workers": expected an integer >= 1, got "x"',
        ),
        (
            ["--listen", ":80", "--workers", "0", "--", "a"],
            'command line: key "workers": expected an integer >= 1, got 0',
        ),
        (
            ["--listen", ":80", "--drain-timeout", "soon", "--", "a"],
            'command line: key "drain_timeout": expected a duration > 0',
        ),
        (["--listen", ":80", "--env", "NOVALUE", "--", "a"], 'key "env": expected KEY=VALUE'),
        (["--listen", ":80", "--log-level", "loud", "--", "a"], 'key "log_level": expected one'),
        (["--listen", "nope", "--", "a"], 'command line: key "listen": expected "unix:/path"'),
        (["--listen", ":80"], "command line: no command: give one after --, e.g. flypool run"),
        (["--listen", ":80", "--"], "command line: no command"),
        (["--", "a"], 'command line: key "listen" is required'),
        (
            ["--listen", ":80", "--listen", ":80", "--", "a"],
            'command line: key "listen": expected each address once',
        ),
        (
            ["--listen", ":80", "--", "a", "{port}"],
            'command line: key "command": expected "{socket}" with worker_bind = "unix"',
        ),
    ],
)
def test_flag_errors(argv: list[str], expected: str) -> None:
    """Flag values go through the same checks as the file and read the same."""
    assert expected in _run_error(*argv)


def test_flags_override_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With -c, flags win over the file, for daemon keys and the single app."""
    path = _write(tmp_path, SPEC_EXAMPLE)
    monkeypatch.chdir(tmp_path)
    config = _run(
        "-c", path, "--log-level", "debug", "--admin-socket", "admin.sock", "--workers", "8",
        "--env", "EXTRA=1", "--", "python", "app.py", "{socket}",
    )  # fmt: skip
    assert config.path == os.path.abspath(path)
    assert config.daemon.log_level == "debug"
    assert config.daemon.admin_socket == str(tmp_path / "admin.sock")
    assert config.daemon.body_timeout == 60.0
    (app,) = config.apps
    assert app.workers == 8
    assert app.command == ("python", "app.py", "{socket}")
    assert dict(app.env) == {"APP_ENV": "production", "EXTRA": "1"}
    assert app.root == "/srv/blog/current"


def test_daemon_flags_with_a_multi_app_file(tmp_path: Path) -> None:
    """Daemon flags apply whatever the number of apps."""
    second = MINIMAL_APP.replace('"blog"', '"shop"').replace("blog.sock", "shop.sock")
    path = _write(tmp_path, MINIMAL_APP + second)
    config = _run("-c", path, "--log-format", "json")
    assert config.daemon.log_format == "json"
    assert [app.name for app in config.apps] == ["blog", "shop"]


def test_app_flags_need_exactly_one_app(tmp_path: Path) -> None:
    """App flags are ambiguous when the file has several apps."""
    second = MINIMAL_APP.replace('"blog"', '"shop"').replace("blog.sock", "shop.sock")
    path = _write(tmp_path, MINIMAL_APP + second)
    message = _run_error("-c", path, "--workers", "2")
    assert "--workers" in message
    assert f"when {path} has exactly one [[app]], it has 2" in message
    assert "a command" in _run_error("-c", path, "--", "python", "app.py")


def test_file_errors_in_flag_mode_name_the_file(tmp_path: Path) -> None:
    """With -c a bad file is reported as in `flypool check`."""
    path = _write(tmp_path, MINIMAL_APP + "workers = -1\n")
    assert _run_error("-c", path).startswith(f'{path}: app "blog": key "workers"')
    assert "cannot read file" in _run_error("-c", str(tmp_path / "missing.toml"))


def test_flag_check_errors_win_over_a_good_file(tmp_path: Path) -> None:
    """A bad flag value is blamed on the command line, not on the file."""
    path = _write(tmp_path, MINIMAL_APP)
    message = _run_error("-c", path, "--workers", "many")
    assert message == 'command line: key "workers": expected an integer >= 1, got "many"'


def test_config_from_dict_does_not_mutate_its_input() -> None:
    """Validation reads the raw tables; callers (reload) can reuse them."""
    data: dict[str, Any] = {"daemon": {"log_level": "debug"}, "app": [_app(root="rel")]}
    before = copy.deepcopy(data)
    config = config_from_dict(data, "flypool.toml", base_dir="/etc/flypool")
    assert data == before
    assert config.apps[0].root == "/etc/flypool/rel"


def test_help_lists_every_key_flag() -> None:
    """`flypool run --help` renders and shows one flag per config key."""
    text = _parser().format_help()
    for key in {*config_module._APP_CHECKS, *config_module._DAEMON_CHECKS} - {"command"}:
        assert "--" + key.replace("_", "-") in text


# --- keys added with SPEC §3's second round ----------------------------------


@pytest.mark.parametrize(
    ("key", "raw", "value"),
    [
        ("restart_batch", "auto", "auto"),
        ("restart_batch", 3, 3),
        ("canary_max_error_rate", "0.5%", 0.005),
        ("canary_max_error_rate", 0.02, 0.02),
        ("canary_max_latency_ratio", 0, 0.0),
        ("canary_max_latency_ratio", 3, 3.0),
        ("preload", ["myapp.wsgi", "numpy"], ("myapp.wsgi", "numpy")),
        ("max_workers", 8, 8),
        ("worker_idle_time", "30s", 30.0),
        ("memory_reserve", "1GB", 1024**3),
        ("proxy_protocol", True, True),
    ],
)
def test_new_app_keys_parse(key: str, raw: Any, value: Any) -> None:
    """Each new app key takes the documented spellings."""
    config = config_from_dict({"app": [_app(**{key: raw})]}, "flypool.toml")
    assert getattr(config.apps[0], key) == value


@pytest.mark.parametrize(
    ("key", "raw", "fragment"),
    [
        ("restart_batch", "big", 'an integer >= 1 or "auto"'),
        ("restart_batch", 0, 'an integer >= 1 or "auto"'),
        ("canary_max_error_rate", "1", 'a percentage like "1%"'),
        ("canary_max_error_rate", "150%", 'a percentage like "1%"'),
        ("canary_max_latency_ratio", 0.5, "a number >= 0 like 2.0"),
        ("preload", "myapp", "a list of Python module names"),
        ("preload", ["my-app"], "a list of Python module names"),
        ("max_workers", 2, "at least workers (4)"),
        ("canary", -1, "an integer >= 0"),
    ],
)
def test_new_app_key_errors(key: str, raw: Any, fragment: str) -> None:
    """Bad values of the new keys name the key and what was expected."""
    message = _dict_error({"app": [_app(**{key: raw})]})
    assert f'key "{key}"' in message
    assert fragment in message


def test_daemon_keys_of_the_second_round() -> None:
    """send_timeout, underscores_in_headers and max_pool_size are checked."""
    config = config_from_dict(
        {
            "daemon": {"send_timeout": "5s", "underscores_in_headers": "refuse"},
            "app": [_app()],
        },
        "flypool.toml",
    )
    assert (config.daemon.send_timeout, config.daemon.underscores_in_headers) == (5.0, "refuse")
    message = _dict_error({"daemon": {"underscores_in_headers": "yes"}, "app": [_app()]})
    assert 'key "underscores_in_headers"' in message
    message = _dict_error({"daemon": {"max_pool_size": 3}, "app": [_app()]})
    assert 'key "max_pool_size"' in message
    assert "(4, counting max_workers)" in message


def test_new_keys_have_flags() -> None:
    """Every new key is also a `flypool run` flag."""
    config = _run(
        "--listen", "unix:/tmp/x.sock", "--restart-batch", "auto", "--preload", "a.b",
        "--preload", "c", "--canary-max-error-rate", "2%", "--max-workers", "6",
        "--no-retry-idempotent", "--", "app", "{socket}",
    )  # fmt: skip
    app = config.apps[0]
    assert (app.restart_batch, app.preload, app.canary_max_error_rate) == (
        "auto",
        ("a.b", "c"),
        0.02,
    )
    assert (app.max_workers, app.retry_idempotent) == (6, False)
