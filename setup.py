"""Build script: flypool's pure-Python package, with its hot path compiled by mypyc.

Everything declarative is in pyproject.toml; this file only adds the C
extensions. The modules named in ``flypool._impl.COMPILED`` are compiled by
mypyc into one group: an extension per module, beside its ``.py`` under the
same name (``flypool/http/parsing.*.so``), and one shared library,
``flypool/_mypyc__mypyc.*.so``. The ``.py`` files are installed too, and
``flypool/_compiled.json`` records the SHA-256 of each source as compiled, so
that ``flypool._impl`` can run either implementation and never a stale one.

The compiled part is optional: when mypyc is not importable, the platform is
not CPython, ``FLYPOOL_PURE_BUILD=1`` is set, or generating or compiling the C
code fails (no C compiler, no Python headers, ``CC=/bin/false``), the build
says why on stderr and installs the pure-Python package alone, as a
``py3-none-any`` wheel. ``FLYPOOL_REQUIRE_COMPILED=1`` turns that fallback
into an error (for CI and packagers who want to be sure).
"""

from __future__ import annotations

import hashlib
import json
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
# Relative to the project root (setuptools wants relative source paths; the
# build backend runs this file from the root); one directory per build, so
# that two builds of one work tree at the same time do not mix their files.
WORK = Path("build") / f"mypyc-{os.getpid()}"
GROUP = "flypool._mypyc"
"""mypyc's shared library becomes ``flypool/_mypyc__mypyc``: inside the package."""

_impl: dict[str, Any] = runpy.run_path(str(ROOT / "src" / "flypool" / "_impl.py"))
MODULES: tuple[str, ...] = tuple(_impl["COMPILED"])
MANIFEST: str = _impl["MANIFEST"]


def _note(message: str) -> None:
    print(f"flypool build: {message}", file=sys.stderr, flush=True)


def _source(module: str) -> Path:
    return Path("src").joinpath(*module.split(".")).with_suffix(".py")


def _why_not_compile() -> str:
    """Why nothing is even attempted (empty: try)."""
    if os.environ.get("FLYPOOL_PURE_BUILD", "") not in ("", "0"):
        return "FLYPOOL_PURE_BUILD is set"
    if platform.python_implementation() != "CPython":
        return f"{platform.python_implementation()} is not CPython"
    try:
        import mypyc.build  # noqa: F401
    except ImportError as err:
        return f"mypyc is not importable ({err})"
    return ""


def _mypyc_extensions() -> list[Extension]:
    from mypyc.build import mypycify

    WORK.mkdir(parents=True, exist_ok=True)
    # Not the project's [tool.mypy] (strict, files = src + tests): only what
    # compiling needs; errors in modules the compiled ones import are not ours.
    config = WORK / "mypy.ini"
    config.write_text(
        "[mypy]\nfollow_imports = silent\nignore_missing_imports = True\n"
        f"cache_dir = {WORK / 'mypy_cache'}\n"
    )
    paths = [str(_source(m)) for m in MODULES]
    extensions: list[Extension] = mypycify(
        ["--config-file", str(config), *paths],
        group_name=GROUP,
        target_dir=str(WORK / "c"),
        opt_level="3",
    )
    return extensions


class OptionalMypycBuildExt(build_ext):
    """build_ext that compiles the hot path when it can and falls back to pure Python."""

    def run(self) -> None:
        # The C code is generated here, not at import or in finalize_options:
        # metadata and sdist builds run this file (and finalize build_ext) too.
        self._remove_manifests()
        extensions = self._generate()
        self.distribution.ext_modules = self.extensions = extensions
        # Always compile: objects left in build/ by an earlier build must not
        # stand in for a compiler this build does not have (CC=/bin/false).
        self.force = True
        try:
            if extensions:
                self._register(extensions)
                super().run()
                self._write_manifests()
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

    def _package_dirs(self) -> list[Path]:
        """Where ``flypool/`` is built (build_lib) and, editable, the source tree."""
        dirs = [Path(self.build_lib) / "flypool"]
        if self.inplace or getattr(self, "editable_mode", False):
            dirs.append(Path("src") / "flypool")
        return dirs

    def _write_manifests(self) -> None:
        digests = {m: hashlib.sha256(_source(m).read_bytes()).hexdigest() for m in MODULES}
        text = json.dumps({"modules": digests}, indent=1, sort_keys=True) + "\n"
        for folder in self._package_dirs():
            if folder.is_dir():
                (folder / MANIFEST).write_text(text)

    def _remove_manifests(self) -> None:
        for folder in self._package_dirs():
            (folder / MANIFEST).unlink(missing_ok=True)

    def _remove_outputs(self) -> None:
        # No half-built group: a module's extension without the shared library
        # (or the reverse) must not stay behind.
        for ext in self.extensions:
            for path in (
                Path(self.get_ext_fullpath(ext.name)),
                Path(self.build_lib) / self.get_ext_filename(ext.name),
            ):
                path.unlink(missing_ok=True)
        self._remove_manifests()

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
