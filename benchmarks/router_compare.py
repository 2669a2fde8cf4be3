"""flypool's cost per request against nginx and HAProxy in front of the same backend.

``wrk -t1 -c32 --latency`` (keep-alive) through each front in turn, in interleaved rounds
(medians over rounds; ratios are medians of per-round ratios): ``direct`` (the backend
on TCP), ``nginx/tcp|unix`` (1 worker, upstream keepalive 64), ``haproxy/tcp|unix`` (1
thread, http-reuse always) and ``flypool/unix`` (1 worker, ``worker_concurrency = 0``).
Backends: ``fast`` (``benchmarks/apps/fast_backend.py``: uvloop + httptools, one
process) and ``gunicorn`` (one sync worker, which closes every connection: one upstream
connect per request). A front's CPU per request, user and system, is read around each
run: nginx master + worker, HAProxy, flypool's daemon (not its worker). With the first
backend each round also runs ``flypool/unix + idle``: the same run while ``--idle``
keep-alive connections (each has sent one request) sit on flypool's Unix listener.
"""

from __future__ import annotations

import contextlib
import re
import resource
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import harness as h
import psutil

S = h.Suite("router_compare", "Router tax: flypool against nginx and HAProxy", __doc__)
S.arg("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
S.arg("--duration", type=int, default=8, help="seconds per wrk run (default 8)")
S.arg("--connections", type=int, default=32, help="wrk -c (default 32)")
S.arg("--backends", default="fast,gunicorn", help="comma-separated (default both)")
S.arg("--idle", type=int, default=10_000, help="idle connections; 0 = skip (default 10000)")


def fast(addr: str) -> list[str]:
    """The fast keep-alive backend (httptools, one constant answer) on an address."""
    where = ["--socket", addr[5:]] if addr.startswith("unix:") else ["--port", addr.split(":")[1]]
    return [h.PY, h.APPS / "fast_backend.py", *where]


BACKENDS: dict[str, Callable[[str], list[str]]] = {
    "fast": fast,
    "gunicorn": lambda addr: h.gunicorn(addr, "flypool.example.wsgi:app"),
}
IDLE_GET = b"GET / HTTP/1.1\r\nHost: idle\r\n\r\n"


@dataclass
class Front:
    """One thing wrk loads, the processes whose CPU counts, and its runs."""

    backend: str
    kind: str
    url: str
    pids: Callable[[], list[int]] = list
    before: Callable[[], None] | None = None
    after: Callable[[], dict[str, Any]] | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)

    def run(self, seconds: int, connections: int) -> dict[str, Any]:
        """One wrk run with the CPU used meanwhile, per request in µs."""
        if self.before:
            self.before()
        user, system = h.cpu_times(pids := self.pids())
        result = h.wrk(self.url, seconds, connections)
        user2, system2 = h.cpu_times(pids)
        n = max(1, result["requests"])
        if pids:
            result |= {"user_us": (user2 - user) * 1e6 / n, "sys_us": (system2 - system) * 1e6 / n}
            result["cpu_us"] = result["user_us"] + result["sys_us"]
        if self.after:
            result |= self.after()
        self.runs.append(result)
        return result

    def med(self, key: str) -> float | None:
        """Median of a figure over the rounds."""
        return h.median(r.get(key) for r in self.runs)


def ratio(a: Front, b: Front, key: str) -> float | None:
    """Median of the per-round ratios a/b of a figure (None for a front against itself)."""
    if a is b:
        return None
    return h.median(
        x[key] / y[key]
        for x, y in zip(a.runs, b.runs, strict=True)
        if x.get(key) is not None and y.get(key)
    )


def read_answer(sock: socket.socket) -> None:
    """Read one whole Content-Length answer, which must keep the connection open."""
    buf = b""
    while True:
        if not (chunk := sock.recv(65536)):
            raise h.BenchError("the daemon closed an idle connection before answering")
        buf += chunk
        head, sep, body = buf.partition(b"\r\n\r\n")
        if sep and (length := re.search(rb"(?i)\ncontent-length:\s*(\d+)", head)):
            if b"connection: close" in head.lower():
                raise h.BenchError("the daemon answered Connection: close on an idle connection")
            if len(body) >= int(length[1]):
                return


class Idle:
    """``count`` keep-alive connections opened on a Unix socket around each wrk run."""

    def __init__(self, path: str, count: int, daemon: int) -> None:
        self.path, self.count, self.daemon = path, count, psutil.Process(daemon)
        self.socks: list[socket.socket] = []
        self.base_fds = self.daemon.num_fds()
        self.rss_open = self.fds_open = 0
        self.open_s = 0.0

    def open(self) -> None:
        """Wait until the last round's connections are gone, then open them in batches."""
        h.poll(lambda: self.daemon.num_fds() <= self.base_fds + 16 or None, 60, "fds to settle")
        started = time.monotonic()
        while len(self.socks) < self.count:
            batch = []
            for _ in range(min(500, self.count - len(self.socks))):
                sock = socket.socket(socket.AF_UNIX)
                self.socks.append(sock)
                sock.settimeout(30)
                sock.connect(self.path)
                sock.sendall(IDLE_GET)
                batch.append(sock)
            for sock in batch:
                read_answer(sock)
        self.open_s = time.monotonic() - started
        self.rss_open, self.fds_open = self.daemon.memory_info().rss, self.daemon.num_fds()

    def close(self) -> dict[str, Any]:
        """Count the connections lost during the run, ask 100 of them again, close all."""
        try:
            with selectors.DefaultSelector() as sel:
                for sock in self.socks:
                    sel.register(sock, selectors.EVENT_READ)
                lost = len(sel.select(0))  # readable = EOF or stray bytes
            for sock in self.socks[:100]:
                sock.sendall(IDLE_GET)
                read_answer(sock)
            rss = max(self.rss_open, self.daemon.memory_info().rss)
            return {"idle_lost": lost, "idle_open_s": self.open_s, "rss": rss, "fds": self.fds_open}
        finally:
            for sock in self.socks:
                sock.close()
            self.socks = []


def setup(name: str, a: Any, stack: contextlib.ExitStack, idle: bool) -> list[Front]:
    """Start one backend's servers and fronts (stopped by ``stack``)."""
    command = BACKENDS[name]
    port, tmp = h.free_port(), h.tmpdir()
    tcp = stack.enter_context(
        h.start_server(f"{name}-tcp", command(f"127.0.0.1:{port}"), f"127.0.0.1:{port}")
    )
    unix = stack.enter_context(
        h.start_server(
            f"{name}-unix", command(f"unix:{tmp}/app.sock"), f"unix:{tmp}/app.sock", tmp=tmp
        )
    )
    fronts = [Front(name, "direct", tcp.url)]
    for kind, start, upstream in (
        ("nginx/tcp", h.nginx, tcp.addr),
        ("nginx/unix", h.nginx, unix.addr),
        ("haproxy/tcp", h.haproxy, tcp.addr),
        ("haproxy/unix", h.haproxy, unix.addr[5:]),
    ):
        proxy = stack.enter_context(start(upstream))
        pids = (
            (lambda p=proxy.proc.pid: [p, *h.children(p)])
            if "nginx" in kind
            else (lambda p=proxy.proc.pid: [p])
        )
        fronts.append(Front(name, kind, proxy.url, pids))
    fp = stack.enter_context(
        h.start_flypool(
            command("unix:{socket}"),
            listen=[f"127.0.0.1:{h.free_port()}", "unix:{tmp}/front.sock"],
            worker_concurrency=0,
        )
    )
    fronts.append(Front(name, "flypool/unix", fp.url, lambda: [fp.proc.pid]))
    if idle:
        conns = Idle(fp.listen[1][5:], a.idle, fp.proc.pid)
        fronts.append(
            Front(
                name, "flypool/unix + idle", fp.url, lambda: [fp.proc.pid], conns.open, conns.close
            )
        )
    return fronts


def run(s: h.Suite, a: Any) -> None:
    """Start everything, run the rounds, compare."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = a.idle + 4096
    with contextlib.suppress(ValueError, OSError):  # children (the daemon) inherit it
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    fronts: list[Front] = []
    with contextlib.ExitStack() as stack:
        for i, name in enumerate(backends):
            h.log(f"starting {name}: backends, nginx, HAProxy, flypool ...")
            fronts += setup(name, a, stack, idle=i == 0 and a.idle > 0)
        for front in fronts:  # warm-up, unrecorded
            if not front.before:
                h.wrk(front.url, 1, a.connections)
        for n in range(1, a.rounds + 1):
            for f in fronts:
                r = f.run(a.duration, a.connections)
                h.log(f"round {n} {f.backend} {f.kind}: {r['rps']:,.0f} req/s, p99 {r['p99']} ms, "
                      f"{h.num(r.get('cpu_us'))} µs CPU/req, {r['errors']} errors")  # fmt: skip
    s.data["fronts"] = [{"backend": f.backend, "front": f.kind, "runs": f.runs} for f in fronts]
    by = {(f.backend, f.kind): f for f in fronts}
    keys = ("rps", "p50", "p99", "cpu_us", "user_us", "sys_us")
    rows = [[f.backend, f.kind, *map(f.med, keys), ratio(f, by[f.backend, "direct"], "rps"),
             sum(r["errors"] + r.get("idle_lost", 0) for r in f.runs)] for f in fronts]  # fmt: skip
    s.md(h.table("backend|front|req/s>|p50 ms>|p99 ms>|CPU µs/req>|user µs>|system µs>|"
                 "req/s vs direct>|errors>", rows))  # fmt: skip
    for b in backends:
        fp = by[b, "flypool/unix"]
        errors = sum(r["errors"] for f in fronts if f.backend == b for r in f.runs)
        s.check(
            f"{b}: errors on every front (wrk socket errors, non-2xx)", errors, "== 0", hard=True
        )
        for t in ("unix", "tcp"):
            ng, ha = by[b, f"nginx/{t}"], by[b, f"haproxy/{t}"]
            s.check(
                f"{b}: flypool req/s ≥ HAProxy's ({t})", ratio(fp, ha, "rps"), ">= 1x", digits=3
            )
            s.check(f"{b}: flypool req/s ≥ 0.95 x nginx's ({t})", ratio(fp, ng, "rps"), ">= 0.95x",
                    digits=3)  # fmt: skip
            for key, limit, what in (("cpu_us", 1.2, "CPU"), ("user_us", 2, "user CPU")):
                x = ratio(fp, ng, key)
                shown = f"{h.num(x, 3)}x ({h.num(fp.med(key), 1)} vs {h.num(ng.med(key), 1)} µs)"
                s.check(f"{b}: flypool {what}/request ≤ {limit:g} x nginx's ({t})", x,
                        f"<= {limit:g}x", shown, digits=3)  # fmt: skip
    if (b := backends[0], "flypool/unix + idle") in by:
        idle, plain = by[b, "flypool/unix + idle"], by[b, "flypool/unix"]
        rss = max(r["rss"] for r in idle.runs) / 1e6
        per_round = [x["rps"] / y["rps"] for x, y in zip(idle.runs, plain.runs, strict=True)]
        s.md(f"**{a.idle:,} idle keep-alive connections** on flypool's Unix listener during the "
             f"`+ idle` runs: throughput with/without per round {h.num(per_round)}; daemon RSS "
             f"with them open {rss:.1f} MB, fds {idle.runs[0]['fds']:,}; opening them took "
             f"{h.num([r['idle_open_s'] for r in idle.runs])} s.")  # fmt: skip
        drop = (1 - (h.median(per_round) or 0)) * 100
        s.check(f"throughput drop with {a.idle:,} idle connections", drop, "< 5 %")
        s.check(f"daemon RSS with {a.idle:,} idle connections", rss, "< 60 MB", digits=1)
        lost = sum(r["idle_lost"] for r in idle.runs)
        s.check("idle connections lost during the load", lost, "== 0", hard=True)
    s.md(f"{a.rounds} interleaved rounds x {a.duration} s of `wrk -t1 -c{a.connections} "
         "--latency` per front; medians over rounds, ratios are medians of per-round ratios. "
         "CPU per request is the front's own (nginx master + worker, HAProxy, flypool's daemon); "
         "flypool reaches its worker over a Unix socket, so the `/unix` rows compare like with "
         "like.")  # fmt: skip


if __name__ == "__main__":
    S.main(run)
