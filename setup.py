"""Build script: flypool's pure-Python package plus mypyc-compiled twins of its hot path.

Everything declarative is in pyproject.toml; this file only adds the C
extensions. Each module named in ``flypool._impl.COMPILED_TWINS`` is copied
under its twin's name (``flypool/http/parsing.py`` →
``flypool/http/_parsing_c.py``) into ``build/mypyc-PID/src`` together with the rest
of the package (mypy follows its imports there), stamped with the SHA-256 of
its source, and compiled by mypyc into ``flypool/http/_parsing_c.*.so`` plus
one shared library, ``flypool/_mypyc__mypyc.*.so``. The pure modules are
installed as usual, so both implementations sit side by side and
``flypool._impl`` picks one at run time.

The compiled part is optional: when mypyc is not importable, the platform is
not CPython, ``FLYPOOL_PURE_BUILD=1`` is set, or generating or compiling the C
code fails (no C compiler, no Python headers, ``CC=/bin/false``), the build
says why on stderr and installs the pure-Python package alone, as a
``py3-none-any`` wheel. ``FLYPOOL_REQUIRE_COMPILED=1`` turns that fallback
into an error (for CI and packagers who want to be sure).
"""

from __future__ import annotations

import ast
import hashlib
import os
import platform
import runpy
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SRC = ROOT / "src"
# Relative to the project root (setuptools wants relative source paths; the
# build backend runs this file from the root); one directory per build, so
# that two builds of one work tree at the same time do not mix their files.
WORK = Path("build") / f"mypyc-{os.getpid()}"
STAGE = WORK / "src"
C_DIR = WORK / "c"
GROUP = "flypool._mypyc"
"""mypyc's shared library becomes ``flypool/_mypyc__mypyc``: inside the package."""

_impl: dict[str, Any] = runpy.run_path(str(SRC / "flypool" / "_impl.py"))
TWINS: dict[str, str] = dict(_impl["COMPILED_TWINS"])
DIGEST_ATTR: str = _impl["SOURCE_DIGEST_ATTR"]


def _note(message: str) -> None:
    print(f"flypool build: {message}", file=sys.stderr, flush=True)


def _module_path(root: Path, module: str) -> Path:
    return root.joinpath(*module.split(".")).with_suffix(".py")


def _why_not_compile() -> str:
    """Why no compiled twins are even attempted (empty: try)."""
    if os.environ.get("FLYPOOL_PURE_BUILD", "") not in ("", "0"):
        return "FLYPOOL_PURE_BUILD is set"
    if platform.python_implementation() != "CPython":
        return f"{platform.python_implementation()} is not CPython"
    try:
        import mypyc.build  # noqa: F401
    except ImportError as err:
        return f"mypyc is not importable ({err})"
    return ""


def _import_text(node: ast.Import | ast.ImportFrom, twins: dict[str, str]) -> str | None:
    """``node`` with every module of ``twins`` replaced by its twin (``None``: unchanged)."""
    if isinstance(node, ast.Import):
        if not any(alias.name in twins for alias in node.names):
            return None
        parts = []
        for alias in node.names:
            if alias.name in twins:
                # Bound under the pure name's first part otherwise: keep the binding.
                as_name = alias.asname or alias.name
                if alias.asname is None and "." in alias.name:
                    raise ValueError(
                        f"use 'import {alias.name} as NAME' or 'from' (line {node.lineno})"
                    )
                parts.append(f"import {twins[alias.name]} as {as_name}")
            else:
                parts.append(
                    f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")
                )
        return "; ".join(parts)
    if node.level:
        raise ValueError(f"relative import in a compiled module (line {node.lineno})")
    module = node.module or ""
    if module in twins:
        names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
        return f"from {twins[module]} import {names}"
    if not any(f"{module}.{a.name}" in twins for a in node.names):
        return None
    parts = []
    for alias in node.names:
        full = f"{module}.{alias.name}"
        if full in twins:
            parts.append(f"import {twins[full]} as {alias.asname or alias.name}")
        else:
            parts.append(
                f"from {module} import {alias.name}"
                + (f" as {alias.asname}" if alias.asname else "")
            )
    return "; ".join(parts)


def twin_source(source: str, twins: dict[str, str]) -> str:
    """``source`` with its imports of compiled modules pointing at their twins.

    A twin imports its sibling twins, not the pure modules: compiled code then
    calls compiled code directly, and both sides agree on one set of classes.
    """
    lines = source.splitlines(keepends=True)
    edits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            text = _import_text(node, twins)
            if text is not None:
                edits.append((node.lineno, node.end_lineno or node.lineno, node.col_offset, text))
    for first, last, col, text in sorted(edits, reverse=True):
        indent = lines[first - 1][:col]
        lines[first - 1 : last] = [f"{indent}{text}\n"]
    return "".join(lines)


def _stage() -> list[str]:
    """Copy the package into `STAGE` and add the stamped twins; their paths."""
    if STAGE.exists():
        shutil.rmtree(STAGE)
    shutil.copytree(
        SRC / "flypool",
        STAGE / "flypool",
        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"),
    )
    paths = []
    for pure, twin in TWINS.items():
        source = _module_path(SRC, pure).read_bytes()
        digest = hashlib.sha256(source).hexdigest()
        target = _module_path(STAGE, twin)
        text = twin_source(source.decode(), TWINS)
        target.write_text(text + f'\n{DIGEST_ATTR} = "{digest}"\n')
        paths.append(str(target))
    # Not the project's [tool.mypy] (strict, files = src + tests, mypy_path =
    # src): only what compiling needs, and errors outside the twins ignored.
    config = STAGE / "mypy.ini"
    config.write_text(
        "[mypy]\n"
        "follow_imports = silent\n"
        "ignore_missing_imports = True\n"
        f"cache_dir = {STAGE / '.mypy_cache'}\n"
    )
    return ["--config-file", str(config), *paths]


def _mypyc_extensions() -> list[Extension]:
    from mypyc.build import mypycify

    args = _stage()
    extensions: list[Extension] = mypycify(
        args, group_name=GROUP, target_dir=str(C_DIR), opt_level="3"
    )
    return extensions


class OptionalMypycBuildExt(build_ext):
    """build_ext that compiles the twins when it can and falls back to pure Python."""

    def run(self) -> None:
        # The C code is generated here, not at import or in finalize_options:
        # metadata and sdist builds run this file (and finalize build_ext) too.
        extensions = self._generate()
        self.distribution.ext_modules = self.extensions = extensions
        # Always compile: objects left in build/ by an earlier build must not
        # stand in for a compiler this build does not have (CC=/bin/false).
        self.force = True
        try:
            self._register(extensions)
            super().run()
        except Exception as err:  # CompileError, LinkError, a missing compiler ...
            self._remove_outputs()
            self._fall_back(f"compiling failed ({type(err).__name__}: {str(err)[:300]})")
        finally:
            shutil.rmtree(WORK, ignore_errors=True)

    def _generate(self) -> list[Extension]:
        why = _why_not_compile()
        if why:
            self._fall_back(why)
            return []
        try:
            return _mypyc_extensions()
        except (Exception, SystemExit) as err:  # mypy reports errors by SystemExit
            traceback.print_exc()
            self._fall_back(f"mypyc could not generate C code ({type(err).__name__}: {err})")
            return []

    def _register(self, extensions: list[Extension]) -> None:
        # What setuptools' finalize_options does for each extension (it ran
        # with the placeholder); none of these links to a shared Library.
        for ext in extensions:
            full = self.get_ext_fullname(ext.name)
            ext._full_name = full
            self.ext_map[full] = self.ext_map[full.split(".")[-1]] = ext
            ext._links_to_dynamic = ext._needs_stub = False
            ext._file_name = self.get_ext_filename(full)

    def _remove_outputs(self) -> None:
        # A shim without its shared library (or the reverse) must not stay behind.
        for ext in self.extensions:
            for path in (
                Path(self.get_ext_fullpath(ext.name)),
                Path(self.build_lib) / self.get_ext_filename(ext.name),
            ):
                path.unlink(missing_ok=True)

    def _fall_back(self, why: str) -> None:
        if os.environ.get("FLYPOOL_REQUIRE_COMPILED", "") not in ("", "0"):
            raise SystemExit(f"flypool build: FLYPOOL_REQUIRE_COMPILED is set, but {why}")
        _note(f"installing the pure-Python hot path only: {why}")
        self.distribution.ext_modules = self.extensions = []
        # The wheel then holds no binary: tag it py3-none-any (bdist_wheel reads
        # this after the build, when it names the wheel and lays out its files).
        bdist_wheel = self.distribution.command_obj.get("bdist_wheel")
        if bdist_wheel is not None:
            bdist_wheel.root_is_pure = True


setup(
    # A placeholder that marks the distribution as having extensions (a
    # platform wheel); `OptionalMypycBuildExt` replaces it with the real ones.
    ext_modules=[Extension(f"{GROUP}__mypyc", sources=[])],
    cmdclass={"build_ext": OptionalMypycBuildExt},
)
