"""A WSGI app with a query of death, for gunicorn ``--workers 2`` (a master and two children).

``/kill`` appends the serving process's pid to ``$QOD_LOG`` and exits that
process at once (os._exit): the gunicorn master survives and forks a new
child. Every other path answers ``pid=N``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from wsgiref.types import StartResponse, WSGIEnvironment


def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    """Answer, or die on ``/kill``."""
    if environ.get("PATH_INFO") == "/kill":
        with open(os.environ["QOD_LOG"], "a") as f:
            f.write(f"{os.getpid()}\n")
        os._exit(1)
    body = f"pid={os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Length", str(len(body))), ("X-Pid", str(os.getpid()))])
    return [body]
