"""Which implementation of the proxy's hot path runs: compiled (mypyc) or pure Python.

At install time ``setup.py`` compiles a copy of each module named in
`COMPILED_TWINS` with mypyc, under the twin's name (``flypool.http.parsing``
→ ``flypool.http._parsing_c``), next to the pure module; where that cannot be
done (no C compiler, no Python headers, no mypyc) only the pure modules are
installed. Both stay importable side by side, so tests can run each.

The choice is made once per process, for all twins together, from the
environment variable ``FLYPOOL_IMPL``:

- ``auto`` (default): compiled when every twin imports and was built from the
  pure module's current source, else pure;
- ``pure``: the pure-Python modules;
- ``compiled``: the compiled twins, or `ImplementationError` when one is
  missing or stale.

A twin carries the SHA-256 of the source it was compiled from: in an editable
install (``pip install -e .``) the pure source can change after the build, and
a stale twin must not run in its place.

A consumer module picks an implementation like this (type checkers see the
pure module, which defines the types)::

    from typing import TYPE_CHECKING
    from flypool import _impl

    if TYPE_CHECKING:
        from flypool.http.state import ClientMachine
    else:
        ClientMachine = _impl.load("flypool.http.state").ClientMachine

This module imports the standard library only: ``setup.py`` reads
`COMPILED_TWINS` from it before anything else is installed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Final

COMPILED_TWINS: Final[dict[str, str]] = {
    "flypool.http.parsing": "flypool.http._parsing_c",
    "flypool.http.retry": "flypool.http._retry_c",
}
"""Pure module → the name its mypyc-compiled copy is built under."""

SOURCE_DIGEST_ATTR: Final = "__flypool_source_sha256__"
"""Module attribute of a twin: SHA-256 (hex) of the pure source it was compiled from."""

ENV: Final = "FLYPOOL_IMPL"
"""Environment variable that chooses: ``auto``, ``pure`` or ``compiled``."""

MODES: Final = ("auto", "pure", "compiled")


class ImplementationError(RuntimeError):
    """``FLYPOOL_IMPL`` asks for something that cannot be had."""


@dataclass(frozen=True)
class Choice:
    """The implementation this process runs, and why."""

    name: str
    """``compiled`` or ``pure``."""
    reason: str
    """Why it is not the other one (empty for compiled)."""

    def describe(self) -> str:
        """For status: ``compiled (mypyc)`` or ``pure Python (why)``."""
        if self.name == "compiled":
            return "compiled (mypyc)"
        return f"pure Python ({self.reason})"

    def summary(self) -> str:
        """For ``--version``: ``compiled hot path`` or ``pure-Python hot path``."""
        return "compiled hot path" if self.name == "compiled" else "pure-Python hot path"


def source_digest(path: str) -> str:
    """SHA-256 (hex) of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def twin_problem(pure: str) -> str:
    """Why the compiled twin of ``pure`` cannot run (empty when it can)."""
    twin = COMPILED_TWINS[pure]
    try:
        module = importlib.import_module(twin)
    except ModuleNotFoundError:
        return f"{twin} not built"
    except Exception as err:  # e.g. an undefined symbol: as bad as missing
        return f"{twin} does not import ({err.__class__.__name__}: {err})"
    built_from = getattr(module, SOURCE_DIGEST_ATTR, None)
    spec = importlib.util.find_spec(pure)
    origin = spec.origin if spec is not None else None
    if built_from is None:
        return f"{twin} carries no source digest"
    # Only where the pure source is at hand (an install without .py files has
    # nothing to compare with, and nothing that could have changed).
    readable = origin is not None and origin.endswith(".py") and os.path.exists(origin)
    if readable and origin is not None and source_digest(origin) != built_from:
        return f"{twin} is stale: {pure} changed since the build (pip install -e . again)"
    return ""


def mode() -> str:
    """The mode asked for by ``FLYPOOL_IMPL`` (``auto`` when unset)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ImplementationError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


@cache
def choice() -> Choice:
    """The implementation of this process (decided on the first call, then fixed)."""
    wanted = mode()
    if wanted == "pure":
        return Choice("pure", f"{ENV}=pure")
    problems = [p for p in map(twin_problem, COMPILED_TWINS) if p]
    if not problems:
        return Choice("compiled", "")
    if wanted == "compiled":
        raise ImplementationError(f"{ENV}=compiled: " + "; ".join(problems))
    return Choice("pure", "; ".join(problems))


def load(pure: str) -> ModuleType:
    """The module to use for ``pure``: its compiled twin or itself, per `choice`."""
    if pure in COMPILED_TWINS and choice().name == "compiled":
        return importlib.import_module(COMPILED_TWINS[pure])
    return importlib.import_module(pure)


def describe() -> str:
    """`Choice.describe` of this process; never raises (a bad ``FLYPOOL_IMPL`` is shown)."""
    try:
        return choice().describe()
    except ImplementationError as err:
        return f"unavailable ({err})"


def summary() -> str:
    """`Choice.summary` of this process; never raises."""
    try:
        return choice().summary()
    except ImplementationError:
        return f"hot path unavailable: bad {ENV}"
