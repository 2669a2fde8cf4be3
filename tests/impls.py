"""Both implementations of the hot path, for tests: compiled (mypyc) and pure Python.

The modules of ``flypool._impl.COMPILED`` keep their names either way; a
process runs one implementation, chosen at ``import flypool`` from
``FLYPOOL_IMPL``. So:

- a test that runs a daemon passes ``impl_env(impl)`` as the daemon's
  environment (``FLYPOOL_IMPL=pure`` or ``compiled``; with ``compiled`` a
  daemon that has no compiled modules refuses to start rather than run pure);
- a test of one module can hold both at once: ``impl_module(name, "pure")``
  loads the module's ``.py`` under another name, ``impl_module(name,
  "compiled")`` is the module this test process imported (compiled)::

      @pytest.mark.parametrize("impl", IMPLS)
      def test_something(impl: str) -> None:
          state = impl_module("flypool.http.state", impl)

The compiled case is skipped only where this machine cannot build it (no C
compiler, no Python headers, no mypyc), and then says so; where it can, a
missing or stale build fails the test: ``pip install -e .`` (scripts/install)
compiles it.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import shlex
import shutil
import sys
import sysconfig
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

from flypool import _impl

IMPLS = ["pure", "compiled"]
"""Values of ``FLYPOOL_IMPL`` that name one implementation."""

PURE_SUFFIX = "__pure"
"""``impl_module(name, "pure")`` is registered as ``name + PURE_SUFFIX``."""


@cache
def build_prerequisites_missing() -> str:
    """What this machine lacks to compile the hot path (empty: nothing)."""
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


def require_compiled() -> None:
    """Return if this process runs the compiled modules; skip where they cannot be built,
    fail where they should have been."""
    found = _impl.problems(_impl.COMPILED, _impl.PACKAGE_DIR)
    if not found and _impl.choice().name == "compiled":
        return
    missing = build_prerequisites_missing()
    if missing:
        pytest.skip(f"the hot path cannot be compiled here: {missing}")
    why = "; ".join(found) or _impl.describe()
    pytest.fail(f"{why}; this machine can compile it: run `pip install -e .` (scripts/install)")


def is_extension(module: ModuleType) -> bool:
    """Whether ``module`` was loaded from a C extension."""
    return (module.__file__ or "").endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def pure_module(name: str) -> ModuleType:
    """The ``.py`` of module ``name``, loaded as ``name + PURE_SUFFIX`` (once)."""
    alias = name + PURE_SUFFIX
    if alias in sys.modules:
        return sys.modules[alias]
    source, _ = _impl.module_files(name, _impl.PACKAGE_DIR)
    spec = importlib.util.spec_from_file_location(alias, source)
    assert spec is not None and spec.loader is not None, source
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module  # dataclasses and enums look their module up
    spec.loader.exec_module(module)
    return module


def impl_module(name: str, impl: str) -> ModuleType:
    """Module ``name`` as pure Python (``impl="pure"``) or compiled (``"compiled"``)."""
    if impl == "pure":
        return pure_module(name)
    if impl == "compiled":
        require_compiled()
        module = importlib.import_module(name)
        assert is_extension(module), module.__file__
        return module
    raise ValueError(f"unknown implementation {impl!r}")


def impl_env(impl: str) -> dict[str, str]:
    """Environment for a daemon that must run implementation ``impl``."""
    if impl == "compiled":
        require_compiled()
    return {**os.environ, _impl.ENV: impl}
