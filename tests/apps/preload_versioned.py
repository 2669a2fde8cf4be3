"""Entry point for the daemon preload tests: ``python -m preload_versioned SOCKET``.

``preload_app`` (its routes and knobs) plus ``GET /version``, which answers
``release_version.VERSION`` (a module of the release directory, written by
the test) and the pid. With ``preload = ["preload_app", "release_version"]``
both modules come from the preloader, so ``/version`` shows which release
the preloader imported. Tests copy this file, ``preload_app.py`` and a
``release_version.py`` into each release.
"""

from __future__ import annotations

import os
import signal
import sys

import preload_app  # type: ignore[import-not-found]  # a sibling in the release
import release_version  # type: ignore[import-not-found]  # written by the test


class Handler(preload_app.Handler):  # type: ignore[misc]
    def do_GET(self) -> None:
        if self.path != "/version":
            super().do_GET()
            return
        body = f"version={release_version.VERSION} pid={os.getpid()}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    path = sys.argv[1]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if os.path.exists(path):
        os.unlink(path)
    with preload_app.Server(path, Handler) as server:
        server.serve_forever()


if __name__ == "__main__":
    main()
