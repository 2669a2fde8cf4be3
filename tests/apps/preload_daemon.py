"""A stand-in daemon for the lifeline test: start a preloader, fork one worker, wait.

Usage: ``preload_daemon.py RELEASE SOCKET``. Prints one JSON line
``{"preloader": PID, "worker": PID}`` once the worker serves, then sleeps
until killed (the test SIGKILLs it and watches both pids go away).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import uvloop

from flypool.preload import Preloader


async def main(release: str, sock: str) -> None:
    argv = [sys.executable, "-m", "preload_serve", sock]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = Preloader.for_command(argv, modules=["preload_app"], release=release, env=env)
    await p.start(30)
    out_r, out_w = os.pipe()
    handle = await p.spawn(argv, env=env, cwd=release, stdout=out_w, stderr=out_w)
    os.close(out_w)
    while not os.path.exists(sock):
        await asyncio.sleep(0.01)
    print(json.dumps({"preloader": p.pid, "worker": handle.pid}), flush=True)
    await asyncio.sleep(3600)
    os.close(out_r)


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], sys.argv[2]))
