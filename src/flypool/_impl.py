"""Which implementation of the proxy's hot path runs: compiled (mypyc) or pure Python.

At install time ``setup.py`` compiles the modules named in `COMPILED` with
mypyc, in place: ``flypool/http/parsing.py`` gets a
``flypool/http/parsing.cpython-311-x86_64-linux-gnu.so`` beside it, which
Python imports in its stead (the way mypy and black ship themselves). The
build also writes `MANIFEST` (``flypool/_compiled.json``): the SHA-256 of
each module's source as it was compiled. Where nothing can be compiled (no C
compiler, no Python headers, no mypyc) only the ``.py`` files are installed.

The choice is made once, when ``flypool`` is first imported (`install`),
for all the modules together, from the environment variable ``FLYPOOL_IMPL``:

- ``auto`` (default): compiled when every module has its extension and was
  built from the ``.py`` that is there now, else pure;
- ``pure``: the ``.py`` files, even where extensions exist;
- ``compiled``: the extensions, or `ImplementationError` (at import) when one
  is missing or stale.

Pure means a finder at the head of ``sys.meta_path`` that loads those modules
from their ``.py`` files. The digest check matters in an editable install
(``pip install -e .``): the source can change after the build, and a stale
extension must not run in its place. Subprocesses inherit ``FLYPOOL_IMPL``, so
a daemon and its tests agree. The modules keep their names either way: the
rest of flypool imports them as usual.

This module imports the standard library only: ``setup.py`` reads `COMPILED`
from it before anything else is installed.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Final

COMPILED: Final[tuple[str, ...]] = (
    "flypool.http.state",
    "flypool.http.framing",
    "flypool.http.parsing",
    "flypool.http.retry",
    "flypool.http.waits",
    "flypool.http.request",
    "flypool.http.upstream",
    "flypool.http.client",
    "flypool.http.router",
    "flypool.pool.balancer",
    "flypool.pool.wait_window",
)
"""The modules that setup.py compiles with mypyc (one shared library, one group)."""

MANIFEST: Final = "_compiled.json"
"""In the ``flypool`` package: ``{"modules": {name: sha256 of the source compiled}}``."""

ENV: Final = "FLYPOOL_IMPL"
"""Environment variable that chooses: ``auto``, ``pure`` or ``compiled``."""

MODES: Final = ("auto", "pure", "compiled")

PACKAGE_DIR: Final = Path(__file__).resolve().parent
"""The installed ``flypool`` package (where the manifest and the modules are)."""


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


def source_digest(path: Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def module_files(name: str, package_dir: Path) -> tuple[Path, list[Path]]:
    """The ``.py`` file of module ``name`` (``flypool.x.y``) under ``package_dir`` (the
    directory of its top-level package), and the extension files beside it."""
    parts = name.split(".")
    folder = package_dir.joinpath(*parts[1:-1])
    stem = parts[-1]
    extensions = [folder / f"{stem}{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    return folder / f"{stem}.py", [p for p in extensions if p.exists()]


def problems(modules: Sequence[str], package_dir: Path) -> list[str]:
    """Why the compiled modules cannot run (empty: they can), without importing any."""
    try:
        manifest = json.loads((package_dir / MANIFEST).read_text())
        built: dict[str, str] = manifest["modules"]
    except (OSError, ValueError, KeyError, TypeError):
        return ["not compiled at install (no C compiler, Python headers or mypyc?)"]
    found = []
    for name in modules:
        source, extensions = module_files(name, package_dir)
        if name not in built or not extensions:
            found.append(f"{name} not compiled")
        elif source.exists() and source_digest(source) != built[name]:
            found.append(f"{name} changed since it was compiled (pip install -e . again)")
    return found


def decide(wanted: str, modules: Sequence[str], package_dir: Path) -> Choice:
    """The choice for mode ``wanted``; `ImplementationError` when ``compiled`` cannot be had."""
    if wanted not in MODES:
        raise ImplementationError(f"{ENV}={wanted!r}: expected one of {', '.join(MODES)}")
    if wanted == "pure":
        return Choice("pure", f"{ENV}=pure")
    found = problems(modules, package_dir)
    if not found:
        return Choice("compiled", "")
    if wanted == "compiled":
        raise ImplementationError(f"{ENV}=compiled: " + "; ".join(found))
    return Choice("pure", "; ".join(found))


class PureFinder(importlib.abc.MetaPathFinder):
    """Finds the named modules as their ``.py`` files, passing over extension modules."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = frozenset(modules)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        """A source spec for one of our modules; ``None`` (the usual finders) otherwise."""
        if fullname not in self.modules:
            return None
        stem = fullname.rpartition(".")[2]
        for entry in path if path is not None else sys.path:
            source = os.path.join(entry, f"{stem}.py")
            if os.path.exists(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None


_choice: Choice | None = None


def install() -> Choice:
    """Decide once per process; when pure, make the modules load from their ``.py`` files.

    Called by ``flypool/__init__.py``, before any of the modules is imported.
    """
    global _choice
    if _choice is None:
        wanted = os.environ.get(ENV, "auto").strip().lower() or "auto"
        choice = decide(wanted, COMPILED, PACKAGE_DIR)
        if choice.name == "pure":
            sys.meta_path.insert(0, PureFinder(COMPILED))
        _choice = choice
    return _choice


def choice() -> Choice:
    """The implementation of this process."""
    return install()


def describe() -> str:
    """`Choice.describe` of this process."""
    return choice().describe()


def summary() -> str:
    """`Choice.summary` of this process."""
    return choice().summary()
