"""The optional compiled hot path: modules compiled in place by setup.py, chosen by flypool._impl.

- every module of ``_impl.COMPILED`` is compiled where this machine can, from
  the current source;
- each compiled module behaves as its ``.py`` (same names and values, same answers);
- ``FLYPOOL_IMPL`` picks the implementation, and a stale build never runs;
- a wheel built without a working C compiler is the pure package, tagged
  ``py3-none-any``, and it works; one built with it carries the extensions
  inside ``flypool/`` and runs them.
"""

from __future__ import annotations

import enum
import hashlib
import importlib
import importlib.machinery
import itertools
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flypool import _impl
from tests.impls import (
    IMPLS,
    build_prerequisites_missing,
    impl_module,
    pure_module,
    require_compiled,
)

REPO = Path(__file__).resolve().parent.parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _public(module: ModuleType) -> dict[str, object]:
    return {k: v for k, v in vars(module).items() if not k.startswith("_")}


def _comparable(value: object) -> object:
    """Values that differ only by which module defined them compare equal."""
    if isinstance(value, type) and issubclass(value, enum.Enum):
        return [(m.name, m.value) for m in value]
    if isinstance(value, enum.Enum):
        return (type(value).__name__, value.name, value.value)
    if isinstance(value, frozenset | set):
        return sorted(map(repr, map(_comparable, value)))
    if isinstance(value, dict):
        return sorted((repr(_comparable(k)), repr(_comparable(v))) for k, v in value.items())
    if isinstance(value, tuple | list):
        return [_comparable(v) for v in value]
    if isinstance(value, type):
        return "class"  # compiled classes differ in kind; behaviour is tested below
    if isinstance(value, ModuleType) or callable(value):
        return "callable or module"  # a Python function in one, a builtin in the other
    return value


# -- the compiled modules -------------------------------------------------------------------


@pytest.mark.parametrize("name", _impl.COMPILED)
def test_module_is_compiled_from_current_source(name: str) -> None:
    """An extension beside the .py, under the module's name, built from the .py as it is."""
    module = impl_module(name, "compiled")
    assert module.__file__ is not None
    source, extensions = _impl.module_files(name, _impl.PACKAGE_DIR)
    # By file name: when another module of the mypyc group was imported first, the
    # group library names its modules' files from its own directory
    # (src/flypool/flypool/http/x.so), a path that does not exist.
    assert Path(module.__file__).name in {e.name for e in extensions}
    manifest = json.loads((_impl.PACKAGE_DIR / _impl.MANIFEST).read_text())
    assert manifest["modules"][name] == hashlib.sha256(source.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", _impl.COMPILED)
def test_compiled_module_has_the_same_names_and_values(name: str) -> None:
    """Same public names; constants, tables and enums equal member by member."""
    compiled = _public(impl_module(name, "compiled"))
    plain = _public(pure_module(name))
    assert sorted(compiled) == sorted(plain)
    for key, value in plain.items():
        assert _comparable(compiled[key]) == _comparable(value), key


@pytest.mark.parametrize("impl", IMPLS)
def test_retry_policy_is_the_same(impl: str) -> None:
    """flypool.http.retry: every verdict over the whole input grid, as the pure module."""
    retry = impl_module("flypool.http.retry", impl)
    pure = pure_module("flypool.http.retry")
    for failure, replayable, resends, retries in itertools.product(
        range(len(pure.Failure)), (False, True), range(10), range(3)
    ):
        got = retry.decide(
            retry.Failure(failure), replayable=replayable, resends=resends, retries=retries
        )
        want = pure.decide(
            pure.Failure(failure), replayable=replayable, resends=resends, retries=retries
        )
        assert (got.name, int(got)) == (want.name, int(want))
    methods = [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE", b"PATCH", b""]
    for method, enabled, kept, upgrade in itertools.product(methods, *[(False, True)] * 3):
        args = {"enabled": enabled, "kept": kept, "upgrade": upgrade}
        assert retry.replayable(method, **args) == pure.replayable(method, **args)
    for status, canary, replay, answered in itertools.product(
        (200, 404, 499, 500, 502, 599), *[(False, True)] * 3
    ):
        flags = {"canary": canary, "replayable": replay, "answered": answered}
        assert retry.reask_canary(status, **flags) == pure.reask_canary(status, **flags)


_TOKEN = st.binary(min_size=1, max_size=12)
_HEADERS = st.lists(st.tuples(_TOKEN, st.binary(max_size=30)), max_size=8)


@settings(max_examples=200, deadline=None)
@given(
    method=_TOKEN,
    target=st.binary(max_size=40),
    headers=_HEADERS,
    status=st.integers(100, 599),
    reason=st.binary(max_size=20),
    body=st.binary(max_size=200),
    connection=st.sampled_from([b"", b"close", b"keep-alive"]),
)
def test_parsing_helpers_agree(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    status: int,
    reason: bytes,
    body: bytes,
    connection: bytes,
) -> None:
    """flypool.http.parsing: the compiled module builds the same bytes as the pure one."""
    compiled = impl_module("flypool.http.parsing", "compiled")
    pure = pure_module("flypool.http.parsing")
    for m in (pure, compiled):
        assert m.build_request_head(method, target, b"1.1", headers) == pure.build_request_head(
            method, target, b"1.1", headers
        )
        assert m.build_response_head(
            b"1.1", status, reason, headers, connection
        ) == pure.build_response_head(b"1.1", status, reason, headers, connection)
        assert m.chunk(body) == pure.chunk(body)
        assert m.target_path(target) == pure.target_path(target)
        assert m.error_response(status, body.decode("latin-1")) == pure.error_response(
            status, body.decode("latin-1")
        )


# -- the choice -----------------------------------------------------------------------------

_REPORT = (
    "import flypool, flypool._impl as i, importlib; "
    "print(i.choice().name); print(i.describe()); "
    "print(' '.join(importlib.import_module(m).__file__ for m in i.COMPILED))"
)


def _run_python(code: str, value: str | None) -> subprocess.CompletedProcess[str]:
    """``python -c code`` with ``FLYPOOL_IMPL=value`` (unset for ``None``)."""
    env = {k: v for k, v in os.environ.items() if k != _impl.ENV}
    if value is not None:
        env[_impl.ENV] = value
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )


def test_flypool_impl_pure_runs_the_py_files() -> None:
    """FLYPOOL_IMPL=pure: the .py files, even where the extensions are built."""
    done = _run_python(_REPORT, "pure")
    assert done.returncode == 0, done.stderr
    name, description, files = done.stdout.splitlines()
    assert (name, description) == ("pure", "pure Python (FLYPOOL_IMPL=pure)")
    assert all(f.endswith(".py") for f in files.split())


def test_flypool_impl_compiled_and_auto_run_the_extensions() -> None:
    """FLYPOOL_IMPL=compiled, and the default (auto), run the extensions when they are built."""
    require_compiled()
    for value in ("compiled", "auto", None):
        done = _run_python(_REPORT, value)
        assert done.returncode == 0, done.stderr
        name, description, files = done.stdout.splitlines()
        assert (name, description) == ("compiled", "compiled (mypyc)")
        assert all(f.endswith(SUFFIX) for f in files.split()), files


def test_flypool_impl_refuses_unknown_values() -> None:
    """A typo is an error at import, not a silent fallback."""
    done = _run_python("import flypool", "fast")
    assert done.returncode != 0
    assert "ImplementationError" in done.stderr and "FLYPOOL_IMPL='fast'" in done.stderr


@pytest.fixture
def fake_package(tmp_path: Path) -> Iterator[Path]:
    """``fpimplpkg/mod.py`` with a file beside it that only looks like its extension (loading
    it would fail), and a manifest that says it was compiled from ``mod.py`` as it is."""
    package = tmp_path / "fpimplpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    source = package / "mod.py"
    source.write_text("WHERE = 'py'\n")
    (package / f"mod{SUFFIX}").write_bytes(b"not an ELF file")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    (package / _impl.MANIFEST).write_text(json.dumps({"modules": {"fpimplpkg.mod": digest}}))
    sys.path.insert(0, str(tmp_path))
    try:
        yield package
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("fpimplpkg", "fpimplpkg.mod"):
            sys.modules.pop(name, None)


def test_built_from_this_source_is_compiled(fake_package: Path) -> None:
    """Manifest, extension and source agree: auto and compiled choose compiled."""
    for mode in ("auto", "compiled"):
        assert _impl.decide(mode, ["fpimplpkg.mod"], fake_package).name == "compiled"


def test_changed_source_is_not_run_compiled(fake_package: Path) -> None:
    """An editable install whose source changed after the build: pure, and why."""
    (fake_package / "mod.py").write_text("WHERE = 'changed'\n")
    choice = _impl.decide("auto", ["fpimplpkg.mod"], fake_package)
    assert choice.name == "pure" and "changed since it was compiled" in choice.reason
    with pytest.raises(_impl.ImplementationError, match="changed since it was compiled"):
        _impl.decide("compiled", ["fpimplpkg.mod"], fake_package)


def test_missing_manifest_or_extension_is_pure(fake_package: Path) -> None:
    """No extension, or no manifest: pure, and the reason says which."""
    (fake_package / f"mod{SUFFIX}").unlink()
    assert (
        "fpimplpkg.mod not compiled" in _impl.decide("auto", ["fpimplpkg.mod"], fake_package).reason
    )
    (fake_package / _impl.MANIFEST).unlink()
    assert "not compiled at install" in _impl.decide("auto", ["fpimplpkg.mod"], fake_package).reason


def test_pure_finder_loads_the_py_beside_an_extension(fake_package: Path) -> None:
    """Python prefers the extension (here a broken one); the finder loads the .py instead."""
    with pytest.raises(ImportError):
        importlib.import_module("fpimplpkg.mod")
    sys.modules.pop("fpimplpkg.mod", None)
    finder = _impl.PureFinder(["fpimplpkg.mod"])
    sys.meta_path.insert(0, finder)
    try:
        module = importlib.import_module("fpimplpkg.mod")
    finally:
        sys.meta_path.remove(finder)
    assert module.WHERE == "py"
    assert module.__file__ == str(fake_package / "mod.py")


# -- wheels, with and without a compiler ----------------------------------------------------


def _project_copy(dest: Path) -> Path:
    """What a build needs, without build products of the work tree (in-place .so, build/)."""
    project = dest / "project"
    project.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, project / name)
    shutil.copytree(
        REPO / "src",
        project / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"),
    )
    return project


def _build_wheel(tmp_path: Path, env_extra: dict[str, str]) -> tuple[Path, str]:
    """``pip wheel`` of a copy of the project with this venv's setuptools and mypy."""
    project = _project_copy(tmp_path)
    out = tmp_path / "wheel"
    env = {**os.environ, **env_extra}
    env.pop(_impl.ENV, None)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v"),
            *("--wheel-dir", str(out), str(project)),
        ],
        capture_output=True,
        text=True,
        timeout=280,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (wheel,) = out.glob("flypool-*.whl")
    return wheel, done.stdout + done.stderr


def _run_from_wheel(wheel: Path, tmp_path: Path, code: str) -> str:
    """Run ``code`` with the unpacked wheel first on the path (dependencies from this venv)."""
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(wheel) as whl:
        whl.extractall(unpacked)
    env = {k: v for k, v in os.environ.items() if k != _impl.ENV}
    env["PYTHONPATH"] = str(unpacked)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


_WHEEL_REPORT = "import flypool; print(flypool.__file__); " + _REPORT


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_without_a_compiler_is_pure_and_works(tmp_path: Path) -> None:
    """CC=/bin/false: the build says why, and the wheel is the pure package (py3-none-any)."""
    wheel, log = _build_wheel(tmp_path, {"CC": "/bin/false"})
    assert "installing the pure-Python hot path only: compiling failed" in log
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
    assert "flypool/_impl.py" in names
    assert f"flypool/{_impl.MANIFEST}" not in names
    assert not [n for n in names if n.endswith(".so")]
    where, name, description, files = _run_from_wheel(wheel, tmp_path, _WHEEL_REPORT).splitlines()
    assert where.startswith(str(tmp_path / "unpacked"))
    assert (name, description) == ("pure", "pure Python (not compiled at install (no C "
                                   "compiler, Python headers or mypyc?))")  # fmt: skip
    assert all(f.endswith(".py") for f in files.split())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_with_a_compiler_carries_the_extensions(tmp_path: Path) -> None:
    """With gcc and the headers: a CPython wheel whose extensions run, all inside flypool/."""
    missing = build_prerequisites_missing()
    if missing:
        pytest.skip(f"cannot compile here: {missing}")
    wheel, _ = _build_wheel(tmp_path, {})
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert f"-{tag}-{tag}-" in wheel.name, wheel.name
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
    binaries = [n for n in names if n.endswith(".so")]
    for module in _impl.COMPILED:
        path = module.replace(".", "/")
        assert f"{path}{SUFFIX}" in binaries and f"{path}.py" in names, (module, binaries)
    assert f"flypool/_mypyc__mypyc{SUFFIX}" in binaries
    assert all(n.startswith("flypool/") for n in binaries), binaries
    assert f"flypool/{_impl.MANIFEST}" in names
    where, name, description, files = _run_from_wheel(wheel, tmp_path, _WHEEL_REPORT).splitlines()
    assert where.startswith(str(tmp_path / "unpacked"))
    assert (name, description) == ("compiled", "compiled (mypyc)")
    assert all(f.endswith(SUFFIX) for f in files.split()), files


def test_status_and_version_say_which_implementation_runs() -> None:
    """`GET /status` carries the choice, `flypool status` shows it, `--version` names it."""
    from flypool.status import build_status
    from flypool.status_view import render_status

    status = build_status([], started_at=0.0, now=1.0, instance="/run/x.sock")
    assert status["hot_path"] == _impl.describe()
    assert f"Version : {status['version']}, hot path {_impl.describe()}" in render_status(status)
    for value in ("pure", None):
        env = {k: v for k, v in os.environ.items() if k != _impl.ENV}
        if value is not None:
            env[_impl.ENV] = value
        done = subprocess.run(
            [sys.executable, "-m", "flypool", "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        expected = "pure-Python hot path" if value == "pure" else _impl.summary()
        assert done.stdout.strip().endswith(f"({expected})"), done.stdout
