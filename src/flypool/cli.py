"""The `flypool` command line (SPEC §4).

`flypool run` is the daemon itself; every other subcommand is a short-lived
client of the daemon's admin socket. Client commands import neither the daemon
nor uvloop, so they start fast.

Exit status: 0 ok, 1 the operation failed, 2 usage or config error, 3 daemon
not reachable.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn, TextIO

from flypool import __version__, _impl
from flypool.admin.client import (
    AdminClient,
    AdminResponse,
    DaemonUnreachable,
    app_path,
    find_admin_socket,
)
from flypool.config import (
    Config,
    ConfigError,
    add_run_arguments,
    config_from_run_args,
    load_config,
)
from flypool.status_view import render_status

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_UNREACHABLE", "EXIT_USAGE", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

POLL_INTERVAL_S = 0.2
"""How often `restart --wait` asks the daemon for its status."""

DEFAULT_WAIT_TIMEOUT_S = 30 * 60.0
"""How long `restart --wait` waits before giving up (Passenger-sized apps can be slow to boot)."""


class CommandError(Exception):
    """A failure to report on stderr with the given exit status.

    The message is printed as `flypool: <message>`, except `raw` messages (config
    errors), which are complete user messages already.
    """

    def __init__(self, message: str, exit_code: int = EXIT_FAILED, *, raw: bool = False) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.raw = raw


# ---------------------------------------------------------------------------
# Argument parsing


def _duration(text: str) -> float:
    """Parse `--timeout` values: `90`, `90s`, `500ms`, `2m`, `1h` (argparse `type`)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (expected e.g. 90s, 2m, 1h)")
    value = float(match.group(1))
    factor = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2) or "s"]
    return value * factor


def _worker_count(text: str) -> int:
    """Parse the N of `scale APP N` (argparse `type`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid worker count {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"worker count must be 0 or more, not {value}")
    return value


def _client_options() -> argparse.ArgumentParser:
    """The options every client subcommand takes to find the daemon."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("finding the daemon")
    group.add_argument(
        "--admin-socket",
        metavar="PATH",
        help="the daemon's admin socket (default: $FLYPOOL_ADMIN_SOCKET, "
        "else the config's daemon.admin_socket, else /run/flypool/admin.sock)",
    )
    group.add_argument(
        "-c", "--config", metavar="FILE", help="read the admin socket path from this config file"
    )
    return common


def _add_run_parser(subparsers: Any) -> None:
    """Register `run`; its flags are defined by `flypool.config`, next to the keys they set."""
    run = subparsers.add_parser(
        "run",
        help="run the daemon in the foreground",
        description="Run the daemon in the foreground (what systemd or runit start).",
    )
    add_run_arguments(run)


def build_parser() -> argparse.ArgumentParser:
    """The `flypool` argument parser with all subcommands of SPEC §4."""
    parser = argparse.ArgumentParser(
        prog="flypool",
        description="A process supervisor for web applications with zero-downtime restarts.",
    )
    parser.add_argument(
        "--version", action="version", version=f"flypool {__version__} ({_impl.summary()})"
    )
    sub = parser.add_subparsers(dest="subcommand", metavar="COMMAND")
    common = _client_options()

    _add_run_parser(sub)

    status = sub.add_parser("status", parents=[common], help="show the pool state")
    status.add_argument("--json", action="store_true", help="print the daemon's JSON status")

    restart = sub.add_parser(
        "restart", parents=[common], help="restart apps (all when none is named)"
    )
    restart.add_argument("apps", nargs="*", metavar="APP", help="app to restart (default: all)")
    mode = restart.add_mutually_exclusive_group()
    mode.add_argument(
        "--rolling", dest="mode", action="store_const", const="rolling", help="rolling restart"
    )
    mode.add_argument(
        "--blocking",
        dest="mode",
        action="store_const",
        const="blocking",
        help="stop all workers, then start new ones",
    )
    restart.add_argument(
        "--canary",
        type=int,
        metavar="N",
        help="start with N canary workers judged against the old ones (0 = none; "
        "default: the app's canary key)",
    )
    restart.add_argument(
        "--wait",
        action="store_true",
        help="show progress until done; exit 1 if the restart failed or was aborted",
    )
    restart.add_argument(
        "--timeout",
        type=_duration,
        default=DEFAULT_WAIT_TIMEOUT_S,
        metavar="DURATION",
        help="with --wait: give up after this long (default: 30m)",
    )

    scale = sub.add_parser("scale", parents=[common], help="change an app's worker count")
    scale.add_argument("app", metavar="APP")
    scale.add_argument("workers", metavar="N", type=_worker_count)

    sub.add_parser("reload", parents=[common], help="re-read the config file (like SIGHUP)")

    stop = sub.add_parser("stop", parents=[common], help="shut the daemon down gracefully")
    stop.add_argument(
        "--fast", action="store_true", help="do not wait for in-flight requests to finish"
    )

    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", metavar="FILE", required=True)
    # Accepted (and unused) so that `--admin-socket` works with every subcommand.
    check.add_argument("--admin-socket", metavar="PATH", help=argparse.SUPPRESS)

    for name, what in (
        ("promote", "end a canary now: roll the release out to every worker"),
        ("rollback", "end a canary now: retire it and keep the old generation"),
    ):
        cmd = sub.add_parser(name, parents=[common], help=what + " (all apps when none)")
        cmd.add_argument("apps", nargs="*", metavar="APP")

    for name, verb in (("drain", "503"), ("undrain", "200")):
        cmd = sub.add_parser(
            name, parents=[common], help=f"make health_path answer {verb} (all apps when none)"
        )
        cmd.add_argument("apps", nargs="*", metavar="APP")
    return parser


# ---------------------------------------------------------------------------
# Helpers shared by the client commands


def _say(text: str, stream: TextIO | None = None) -> None:
    # Flushed at once: `restart --wait` output is progress, often read through a pipe.
    print(text, file=stream or sys.stdout, flush=True)


def _client(args: argparse.Namespace) -> AdminClient:
    """An admin client for the socket the options, environment or config point at."""
    try:
        path = find_admin_socket(args.admin_socket, args.config)
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE, raw=True) from exc
    return AdminClient(path)


def _fail(resp: AdminResponse) -> NoReturn:
    """Turn an error answer into a CommandError (exit 1: the operation failed)."""
    raise CommandError(resp.error_message(), EXIT_FAILED)


def _answer(resp: AdminResponse, ok: Sequence[int] = (200, 202)) -> dict[str, Any]:
    """The JSON object of a successful answer; anything else becomes a CommandError."""
    if resp.status not in ok:
        _fail(resp)
    try:
        data = resp.json()
    except ValueError:
        raise CommandError(f"unexpected answer from the daemon (HTTP {resp.status})") from None
    if not isinstance(data, dict):
        raise CommandError(f"unexpected answer from the daemon: {data!r}")
    return data


def _field(data: Mapping[str, Any], key: str, kind: type[Any]) -> Any:
    """`data[key]`, checked to be of `kind`; a daemon speaking another dialect is an error."""
    value = data.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CommandError(f"unexpected answer from the daemon: no {kind.__name__} {key!r}")
    return value


def _post(
    args: argparse.Namespace, path: str, query: Mapping[str, str | int] | None = None
) -> AdminResponse:
    """POST to the daemon found through `args`; used by the one-request subcommands."""
    return _client(args).post(path, query)


def _get_status(client: AdminClient) -> dict[str, Any]:
    return _answer(client.get("/status"), ok=(200,))


# ---------------------------------------------------------------------------
# Subcommands


def _cmd_run(args: argparse.Namespace) -> int:
    # Hand the config layer only its own options, not the dispatcher's bookkeeping.
    run_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "subcommand"})
    try:
        config = config_from_run_args(run_args)
    except ConfigError as exc:
        _say(str(exc), sys.stderr)
        return EXIT_USAGE
    # Imported late: the daemon pulls in uvloop and friends, which clients never need.
    from flypool import daemon

    if config.path is None:
        # Flags only: there is no file to read again, the daemon says so on reload.
        return daemon.run(config)

    def reload_config() -> Config:
        # HUP / `flypool reload` re-read the file and re-apply the command-line
        # overrides, so a reload never silently drops a flag given at start.
        return config_from_run_args(run_args)

    return daemon.run(config, reload_config)


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:  # also a missing or unreadable file
        _say(str(exc), sys.stderr)
        return EXIT_USAGE
    names = ", ".join(app.name for app in config.apps)
    _say(f"OK: {args.config}: {len(config.apps)} app(s): {names}")
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    status = _get_status(_client(args))
    if args.json:
        _say(json.dumps(status, indent=2))
    else:
        sys.stdout.write(render_status(status))
        sys.stdout.flush()
    return EXIT_OK


def _cmd_restart(args: argparse.Namespace) -> int:
    client = _client(args)
    query: dict[str, Any] = {"mode": args.mode} if args.mode else {}
    if args.canary is not None:
        query["canary"] = args.canary
    requested: dict[str, int] = {}
    exit_code = EXIT_OK
    if args.apps:
        # One POST per app; a bad name does not stop the others (like `systemctl restart a b`).
        for name in dict.fromkeys(args.apps):
            resp = client.post(app_path(name, "restart"), query or None)
            if resp.status not in (200, 202):
                _say(f"flypool: {resp.error_message()}", sys.stderr)
                exit_code = EXIT_FAILED
                continue
            data = _answer(resp)
            requested[str(data.get("app", name))] = _field(data, "restart_id", int)
    else:
        data = _answer(client.post("/restart", query or None))
        for item in _field(data, "restarts", list):
            if not isinstance(item, dict):
                raise CommandError(f"unexpected answer from the daemon: {item!r}")
            requested[_field(item, "app", str)] = _field(item, "restart_id", int)

    for name, restart_id in requested.items():
        _say(f"{name}: restart requested (id {restart_id})")
    if args.wait and requested and not _wait_for_restarts(client, requested, args.timeout):
        exit_code = EXIT_FAILED
    return exit_code


def _cmd_scale(args: argparse.Namespace) -> int:
    data = _answer(_post(args, app_path(args.app, "scale"), {"workers": args.workers}))
    _say(f"{data.get('app', args.app)}: scaled to {data.get('workers', args.workers)} worker(s)")
    return EXIT_OK


def _cmd_reload(args: argparse.Namespace) -> int:
    resp = _post(args, "/reload")
    if resp.status == 400:
        # The daemon rejected the new config and kept the old one: a config error.
        raise CommandError(resp.error_message(), EXIT_USAGE)
    _answer(resp)
    _say("flypool: configuration reloaded")
    return EXIT_OK


def _cmd_stop(args: argparse.Namespace) -> int:
    mode = "fast" if args.fast else "graceful"
    _answer(_post(args, "/stop", {"mode": mode}))
    _say(f"flypool: stopping ({mode})")
    return EXIT_OK


def _cmd_end_canary(args: argparse.Namespace) -> int:
    action = args.subcommand  # "promote" or "rollback"
    client = _client(args)
    exit_code = EXIT_OK
    targets = [app_path(n, action) for n in dict.fromkeys(args.apps)] or [f"/{action}"]
    done = "promoted" if action == "promote" else "rolled back"
    for path in targets:
        resp = client.post(path)
        if resp.status != 200:
            _say(f"flypool: {resp.error_message()}", sys.stderr)
            exit_code = EXIT_FAILED
            continue
        data = _answer(resp)
        for item in data.get("apps", [data]):
            if isinstance(item, dict):
                _say(f"{item.get('app', '?')}: canary {done}")
    return exit_code


def _cmd_drain(args: argparse.Namespace) -> int:
    action = args.subcommand  # "drain" or "undrain"
    client = _client(args)
    results: list[Any] = []
    exit_code = EXIT_OK
    if args.apps:
        for name in dict.fromkeys(args.apps):
            resp = client.post(app_path(name, action))
            if resp.status != 200:
                _say(f"flypool: {resp.error_message()}", sys.stderr)
                exit_code = EXIT_FAILED
                continue
            results.append(_answer(resp))
    else:
        results = _field(_answer(client.post(f"/{action}")), "apps", list)
    for item in results:
        # Items are {"app": ..., "drained": ...}; a bare app name is accepted too.
        if isinstance(item, dict):
            name = str(item.get("app", "?"))
            drained = bool(item.get("drained", action == "drain"))
        else:
            name, drained = str(item), action == "drain"
        _say(f"{name}: {'drained' if drained else 'undrained'}")
    return exit_code


# ---------------------------------------------------------------------------
# restart --wait


def _progress_line(name: str, app: Mapping[str, Any]) -> str:
    restart = app.get("restart")
    if isinstance(restart, dict):
        canary = restart.get("canary")
        if restart.get("phase") == "canary" and isinstance(canary, dict):
            return (
                f"{name}: canary waiting for {canary.get('waiting_for')}: "
                f"{canary.get('errors')} of {canary.get('requests')} requests failed "
                f"(old generation: {canary.get('old_errors')} of {canary.get('old_requests')})"
            )
        done, total = restart.get("done", 0), restart.get("total", 0)
        return _step_line(name, str(restart.get("mode", "")), done, total)
    return f"{name}: restart pending"


def _step_line(name: str, mode: str, done: object, total: object) -> str:
    return f"{name}: {mode} restart {done}/{total} replaced"


class _Progress:
    """Prints every step of one app's restart once, from what each poll shows.

    A poll may see several steps at once (a batch, or a slow poll): each one
    still gets its line, and a completed restart ends with ``N/N``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.line = ""
        self.done: int | None = None
        self.mode = ""
        self.total: object = 0

    def running(self, app: Mapping[str, Any]) -> None:
        restart = app.get("restart")
        if not isinstance(restart, dict):
            self._say(_progress_line(self.name, app))
            return
        done = restart.get("done", 0)
        self.mode = str(restart.get("mode", ""))
        self.total = restart.get("total", 0)
        if not isinstance(done, int):
            self._say(_progress_line(self.name, app))
            return
        first = 0 if done == 0 else 1
        start = first if self.done is None else self.done + 1
        for k in range(start, done + 1):
            self._say(_step_line(self.name, self.mode, k, self.total))
        if self.done is None or done >= self.done:
            self.done = done
        self._say(_progress_line(self.name, app))

    def completed(self, last: Mapping[str, Any]) -> None:
        replaced, total = last.get("replaced"), last.get("total")
        if not isinstance(replaced, int) or not isinstance(total, int):
            return
        mode = str(last.get("mode", self.mode))
        start = 1 if self.done is None else self.done + 1
        for k in range(start, replaced + 1):
            self._say(_step_line(self.name, mode, k, total))

    def _say(self, line: str) -> None:
        if line != self.line:
            _say(line)
            self.line = line


def _deployment_error_lines(app: Mapping[str, Any]) -> list[str]:
    error = app.get("deployment_error")
    if not isinstance(error, dict):
        return []
    lines = [f"  release: {error.get('release', '?')}"]
    if error.get("reason"):
        lines.append(f"  reason: {error['reason']}")
    output = error.get("output")
    if isinstance(output, list) and output:
        lines.append("  last output of the failed worker:")
        lines.extend(f"    {line}" for line in output)
    return lines


def _restart_outcome(
    name: str, app: Mapping[str, Any], restart_id: int, progress: _Progress | None = None
) -> bool | None:
    """Report a finished restart and return whether it succeeded; None while it runs.

    Restarts are coalesced, so any finished restart with an id at least ours
    covers our request.
    """
    if app.get("restart") is not None:
        return None
    last = app.get("last_restart")
    if not isinstance(last, dict):
        return None
    last_id = last.get("id")
    if not isinstance(last_id, int) or last_id < restart_id:
        return None
    if last.get("outcome") == "completed":
        if progress is not None:
            progress.completed(last)
        duration = last.get("duration_s")
        took = f" in {duration:.1f}s" if isinstance(duration, int | float) else ""
        if app.get("deployment_error") is None:
            _say(f"{name}: restart completed{took}")
            return True
        # Without resist_deployment_errors a failed slot is skipped and the rollout
        # "completes"; the error left in status means some worker did not start.
        _say(f"{name}: restart completed{took}, but a new worker failed", sys.stderr)
    else:
        reason = last.get("reason") or "no reason given"
        how = "rolled back" if last.get("outcome") == "rolled_back" else "aborted"
        _say(f"{name}: restart {how}: {reason}", sys.stderr)
    for line in _deployment_error_lines(app):
        _say(line, sys.stderr)
    return False


def _wait_for_restarts(
    client: AdminClient,
    requested: Mapping[str, int],
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Poll `GET /status` until every requested restart finished; True if all completed.

    `DaemonUnreachable` propagates (exit 3). Gives up after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    pending = dict(requested)
    progress = {name: _Progress(name) for name in requested}
    all_ok = True
    while True:
        status = _get_status(client)
        apps = {app.get("name"): app for app in status.get("apps") or [] if isinstance(app, dict)}
        for name, restart_id in list(pending.items()):
            app = apps.get(name)
            if app is None:
                # Removed by a reload while we waited: its restart can never finish.
                _say(f"{name}: restart aborted: the app is no longer configured", sys.stderr)
                all_ok = False
                del pending[name]
                continue
            outcome = _restart_outcome(name, app, restart_id, progress[name])
            if outcome is None:
                progress[name].running(app)
                continue
            all_ok = all_ok and outcome
            del pending[name]
        if not pending:
            return all_ok
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _say(
                f"flypool: gave up waiting after {timeout:g}s; still restarting: "
                + ", ".join(pending),
                sys.stderr,
            )
            return False
        sleep(min(POLL_INTERVAL_S, remaining))


# ---------------------------------------------------------------------------
# Entry point

_HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "check": _cmd_check,
    "status": _cmd_status,
    "restart": _cmd_restart,
    "scale": _cmd_scale,
    "reload": _cmd_reload,
    "stop": _cmd_stop,
    "drain": _cmd_drain,
    "undrain": _cmd_drain,
    "promote": _cmd_end_canary,
    "rollback": _cmd_end_canary,
}


def _exit_code(code: object) -> int:
    """The int exit status of a `SystemExit` code (argparse uses 0 and 2)."""
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    """Run the `flypool` command line and return its exit status (the caller exits)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse has already printed usage/help; keep main() a plain function.
        return _exit_code(exc.code)
    if args.subcommand is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return _HANDLERS[args.subcommand](args)
    except DaemonUnreachable as exc:
        _say(
            f"flypool: cannot reach the daemon at {exc.socket_path}: {exc.cause}\n"
            "flypool: point at the daemon with --admin-socket PATH, "
            "FLYPOOL_ADMIN_SOCKET=PATH, or -c FILE (its [daemon] admin_socket)",
            sys.stderr,
        )
        return EXIT_UNREACHABLE
    except CommandError as exc:
        _say(str(exc) if exc.raw else f"flypool: {exc}", sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
