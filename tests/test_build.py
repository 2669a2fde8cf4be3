"""The optional compiled hot path: twins built by setup.py, chosen by flypool._impl.

- every twin is built where this machine can build it, from the current source;
- each twin behaves as its pure module (same names and values, same answers);
- ``FLYPOOL_IMPL`` picks the implementation, and a stale twin never runs;
- a wheel built without a working C compiler is the pure package, tagged
  ``py3-none-any``, and it works; one built with it carries the twins inside
  ``flypool/`` and runs them.
"""

from __future__ import annotations

import enum
import hashlib
import importlib
import importlib.machinery
import itertools
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
from tests.impls import IMPLS, build_prerequisites_missing, impl_module, require_compiled

REPO = Path(__file__).resolve().parent.parent
TWINS = sorted(_impl.COMPILED_TWINS.items())


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


# -- the twins ------------------------------------------------------------------------------


@pytest.mark.parametrize(("pure", "twin"), TWINS)
def test_twin_is_compiled_from_current_source(pure: str, twin: str) -> None:
    """The twin is a C extension next to the pure module, built from its current source."""
    module = require_compiled(pure)
    pure_module = importlib.import_module(pure)
    assert module.__name__ == twin
    assert module.__file__ is not None and pure_module.__file__ is not None
    assert module.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert Path(module.__file__).parent == Path(pure_module.__file__).parent
    source = Path(pure_module.__file__).read_bytes()
    assert getattr(module, _impl.SOURCE_DIGEST_ATTR) == hashlib.sha256(source).hexdigest()


@pytest.mark.parametrize(("pure", "twin"), TWINS)
def test_twin_has_the_same_names_and_values(pure: str, twin: str) -> None:
    """Same public names; constants, tables and enums equal member by member."""
    compiled = _public(require_compiled(pure))
    plain = _public(importlib.import_module(pure))
    assert sorted(compiled) == sorted(plain)
    for name, value in plain.items():
        assert _comparable(compiled[name]) == _comparable(value), name


@pytest.mark.parametrize("impl", IMPLS)
def test_retry_policy_is_the_same(impl: str) -> None:
    """flypool.http.retry: every verdict over the whole input grid, as the pure module."""
    retry = impl_module("flypool.http.retry", impl)
    pure = importlib.import_module("flypool.http.retry")
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
    """flypool.http.parsing: the compiled twin builds the same bytes as the pure module."""
    compiled = require_compiled("flypool.http.parsing")
    pure = importlib.import_module("flypool.http.parsing")
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


def _choice_in_subprocess(value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != _impl.ENV}
    if value is not None:
        env[_impl.ENV] = value
    code = "from flypool import _impl; c = _impl.choice(); print(c.name); print(c.describe())"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )


def test_flypool_impl_pure_runs_pure() -> None:
    """FLYPOOL_IMPL=pure: the pure modules, whatever is built."""
    done = _choice_in_subprocess("pure")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["pure", "pure Python (FLYPOOL_IMPL=pure)"]


def test_flypool_impl_compiled_and_auto_run_the_twins() -> None:
    """FLYPOOL_IMPL=compiled, and the default (auto), run the twins when they are built."""
    for pure in _impl.COMPILED_TWINS:
        require_compiled(pure)
    for value in ("compiled", "auto", None):
        done = _choice_in_subprocess(value)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == ["compiled", "compiled (mypyc)"]


def test_flypool_impl_refuses_unknown_values() -> None:
    """A typo is an error, not a silent fallback."""
    done = _choice_in_subprocess("fast")
    assert done.returncode != 0
    assert "ImplementationError" in done.stderr and "FLYPOOL_IMPL='fast'" in done.stderr


@pytest.fixture
def fake_twin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """A pure module and a (plain Python) stand-in for its twin, registered in COMPILED_TWINS."""
    package = tmp_path / "fptwinpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    pure = package / "mod.py"
    pure.write_text("VALUE = 1\n")
    digest = hashlib.sha256(pure.read_bytes()).hexdigest()
    twin = package / "_mod_c.py"
    twin.write_text(f"VALUE = 1\n{_impl.SOURCE_DIGEST_ATTR} = {digest!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(_impl.COMPILED_TWINS, "fptwinpkg.mod", "fptwinpkg._mod_c")
    yield pure, twin
    for name in ("fptwinpkg", "fptwinpkg.mod", "fptwinpkg._mod_c"):
        sys.modules.pop(name, None)


def test_twin_built_from_this_source_is_used(fake_twin: tuple[Path, Path]) -> None:
    """A twin whose digest matches its pure module's source may run."""
    assert _impl.twin_problem("fptwinpkg.mod") == ""


def test_stale_twin_is_not_used(fake_twin: tuple[Path, Path]) -> None:
    """An editable install whose pure source changed after the build: the twin is stale."""
    pure, _ = fake_twin
    pure.write_text("VALUE = 2\n")
    problem = _impl.twin_problem("fptwinpkg.mod")
    assert "stale" in problem and "pip install -e ." in problem


def test_twin_without_digest_or_missing_is_not_used(fake_twin: tuple[Path, Path]) -> None:
    """No digest, or no twin at all: not usable, and the reason says which."""
    _, twin = fake_twin
    twin.write_text("VALUE = 1\n")
    assert "carries no source digest" in _impl.twin_problem("fptwinpkg.mod")
    twin.unlink()
    sys.modules.pop("fptwinpkg._mod_c", None)
    importlib.invalidate_caches()
    assert _impl.twin_problem("fptwinpkg.mod") == "fptwinpkg._mod_c not built"


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


_REPORT = (
    "import flypool, flypool._impl as i; print(flypool.__file__); print(i.choice().name); "
    "print(i.describe())"
)


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
    assert not [n for n in names if n.endswith(".so")]
    lines = _run_from_wheel(wheel, tmp_path, _REPORT).splitlines()
    assert lines[0].startswith(str(tmp_path / "unpacked"))
    assert lines[1] == "pure"
    assert "not built" in lines[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wheel_with_a_compiler_carries_the_twins(tmp_path: Path) -> None:
    """With gcc and the headers: a CPython wheel whose twins run, all inside flypool/."""
    missing = build_prerequisites_missing()
    if missing:
        pytest.skip(f"cannot compile here: {missing}")
    wheel, _ = _build_wheel(tmp_path, {})
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    assert f"-{tag}-{tag}-" in wheel.name, wheel.name
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
    binaries = [n for n in names if n.endswith(".so")]
    for twin in _impl.COMPILED_TWINS.values():
        assert any(n.startswith(twin.replace(".", "/") + ".") for n in binaries), (twin, binaries)
    assert all(n.startswith("flypool/") for n in binaries), binaries
    lines = _run_from_wheel(wheel, tmp_path, _REPORT).splitlines()
    assert lines[0].startswith(str(tmp_path / "unpacked"))
    assert lines[1:] == ["compiled", "compiled (mypyc)"]


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
