"""Both implementations of the hot path, for tests: each pure module and its mypyc twin.

A test that must hold for both takes the implementation as a parameter::

    from tests.impls import IMPLS, impl_module

    @pytest.mark.parametrize("impl", IMPLS)
    def test_something(impl: str) -> None:
        state = impl_module("flypool.http.state", impl)
        ...

A test that runs a daemon passes ``impl_env(impl)`` as the daemon's
environment (``FLYPOOL_IMPL``): with ``compiled``, ``flypool._impl.load``
raises rather than fall back, so such a daemon never runs pure code unseen.

The compiled case is skipped only where this machine cannot build it (no C
compiler, no Python headers, no mypyc), and then says so; where it can, a
missing or stale twin fails the test: ``pip install -e .`` (scripts/install)
builds the twins.
"""

from __future__ import annotations

import importlib
import os
import shlex
import shutil
import sysconfig
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

from flypool import _impl

IMPLS = ["pure", "compiled"]
"""Values of ``FLYPOOL_IMPL`` that name one implementation."""


@cache
def build_prerequisites_missing() -> str:
    """What this machine lacks to compile the twins (empty: nothing)."""
    missing = []
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    compiler = shlex.split(cc)[0] if cc.strip() else "cc"
    if shutil.which(compiler) is None:
        missing.append(f"no C compiler ({compiler})")
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").exists():
        missing.append(f"no Python headers ({include}/Python.h)")
    try:
        importlib.import_module("mypyc.build")
    except ImportError:
        missing.append("no mypyc")
    return ", ".join(missing)


def require_compiled(pure: str) -> ModuleType:
    """The compiled twin of ``pure``; skips where it cannot be built, fails where it should be."""
    problem = _impl.twin_problem(pure)
    if not problem:
        return importlib.import_module(_impl.COMPILED_TWINS[pure])
    missing = build_prerequisites_missing()
    if missing:
        pytest.skip(f"compiled twin of {pure} cannot be built here: {missing}")
    pytest.fail(f"{problem}; this machine can build it: run `pip install -e .` (scripts/install)")


def impl_module(pure: str, impl: str) -> ModuleType:
    """``pure`` itself (``impl="pure"``) or its compiled twin (``"compiled"``)."""
    if impl == "pure":
        return importlib.import_module(pure)
    if impl == "compiled":
        return require_compiled(pure)
    raise ValueError(f"unknown implementation {impl!r}")


def impl_env(impl: str) -> dict[str, str]:
    """Environment for a daemon that must run implementation ``impl``.

    For ``compiled`` it also checks (skip or fail, as `require_compiled`) that
    the twins are there, so that the daemon's refusal is never the test's result.
    """
    if impl == "compiled":
        for pure in _impl.COMPILED_TWINS:
            require_compiled(pure)
    return {**os.environ, _impl.ENV: impl}
