"""What the admin socket reads and calls on the daemon: a narrow, one-way interface.

``flypool.daemon`` builds the admin server and implements this Protocol;
``flypool.admin`` never imports the daemon, so imports point one way
(daemon → admin → pool).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from flypool.config import Config
    from flypool.pool.app import AppPool


class DaemonControl(Protocol):
    """The daemon as the admin routes see it."""

    @property
    def pools(self) -> Mapping[str, AppPool]:
        """Every app's pool, by name."""

    @property
    def config(self) -> Config:
        """The configuration in force."""

    @property
    def started_at(self) -> float:
        """Loop time the daemon (or its first image, across USR2) started."""

    async def reload_and_restart(self, reason: str = ...) -> str | None:
        """Re-read the configuration and restart every app; an error message or None."""

    def request_stop(self, *, fast: bool) -> None:
        """Stop the daemon (graceful, or fast)."""

    def scale_app(self, name: str, n: int) -> str | None:
        """Set one app's worker count; an error message when refused."""
