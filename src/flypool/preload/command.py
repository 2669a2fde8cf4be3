"""Which interpreter runs a worker command, and what its entry point is (SPEC §11).

Three shapes can be preloaded:

- ``python [OPTIONS] -m MODULE ARGS...`` → ``runpy.run_module(MODULE)``;
- ``python [OPTIONS] SCRIPT ARGS...`` → ``runpy.run_path(SCRIPT)``;
- a console script (``.venv/bin/gunicorn``): a text file whose shebang names
  a Python interpreter (``#!/srv/app/.venv/bin/python``, ``#!/usr/bin/env
  python3``, or pip's ``#!/bin/sh`` + ``'''exec' "/long path/python"``
  trampoline for paths a shebang cannot hold) → ``runpy.run_path`` on it,
  which is what the interpreter would do with it.

Anything else (``node``, a shell script, ``python -c``, a binary) cannot be
preloaded: :func:`plan_command` raises :class:`NotPreloadable` with the reason
and the worker spawns cold. The interpreter is named by the path the command
names (a virtualenv's ``bin/python`` symlink, not what it points to), because
that path is how Python finds the virtualenv.
"""

from __future__ import annotations

import enum
import os
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_PYTHON_NAME = re.compile(r"(python|pypy)[0-9.]*")
# Interpreter options that take no argument and change nothing we must mimic
# beyond passing them on to the preloader's own interpreter.
_SIMPLE_FLAGS = frozenset("bBdEIOPqsSuvx")
# Options with an argument (separate or attached).
_ARG_FLAGS = frozenset("XW")
_SHEBANG_READ = 1024


class NotPreloadable(Exception):
    """The command does not run Python in a way a preloader can reproduce."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EntryKind(enum.Enum):
    """How the forked worker starts the command's code."""

    MODULE = "module"  # runpy.run_module(target)
    PATH = "path"  # runpy.run_path(target)


@dataclass(frozen=True)
class Plan:
    """How to run one worker command from a preloader.

    ``interpreter`` and ``flags`` identify the preloader (workers of one
    preloader must agree on both); ``kind``/``target``/``argv`` are per worker.
    """

    interpreter: str
    flags: tuple[str, ...]
    kind: EntryKind
    target: str
    argv: tuple[str, ...]

    @property
    def key(self) -> tuple[str, tuple[str, ...]]:
        """What a preloader must have been started with to fork this command."""
        return (self.interpreter, self.flags)


def resolve_program(name: str, cwd: str, env: Mapping[str, str]) -> str | None:
    """The file ``name`` runs as (PATH lookup like execvp, relative to ``cwd``)."""
    if "/" in name:
        path = os.path.join(cwd, name)
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    found = shutil.which(name, path=env.get("PATH", os.defpath))
    return os.path.abspath(found) if found is not None else None


def is_python_name(path: str) -> bool:
    """True for ``python``, ``python3``, ``python3.12``, ``pypy3``..."""
    return _PYTHON_NAME.fullmatch(os.path.basename(path)) is not None


def plan_command(argv: Sequence[str], cwd: str, env: Mapping[str, str]) -> Plan:
    """The preload plan for ``argv`` run in ``cwd``; raise NotPreloadable with the reason."""
    if not argv:
        raise NotPreloadable("the command is empty")
    program = resolve_program(argv[0], cwd, env)
    if program is None:
        raise NotPreloadable(f"{argv[0]!r} is not an executable file")
    if is_python_name(program):
        return _python_plan(program, list(argv[1:]), cwd)
    interpreter, flags = _shebang_python(program, env)
    return Plan(interpreter, tuple(flags), EntryKind.PATH, program, (program, *argv[1:]))


def _python_plan(interpreter: str, args: list[str], cwd: str) -> Plan:
    flags: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-m" or (arg.startswith("-m") and not arg.startswith("--")):
            module = arg[2:] or (args[i + 1] if i + 1 < len(args) else "")
            rest = args[i + 1 :] if arg[2:] else args[i + 2 :]
            if not module:
                raise NotPreloadable("python -m without a module name")
            # runpy puts the module's file name in argv[0], as -m does.
            return Plan(interpreter, tuple(flags), EntryKind.MODULE, module, (module, *rest))
        if arg == "--check-hash-based-pycs" and i + 1 < len(args):
            flags += args[i : i + 2]
            i += 2
            continue
        if arg.startswith("-") and arg != "-" and not arg.startswith("--"):
            letter = arg[1]
            if letter in _ARG_FLAGS:
                if len(arg) > 2:
                    flags.append(arg)
                    i += 1
                elif i + 1 < len(args):
                    flags += args[i : i + 2]
                    i += 2
                else:
                    raise NotPreloadable(f"python option {arg} without its value")
                continue
            if all(c in _SIMPLE_FLAGS for c in arg[1:]):
                flags.append(arg)
                i += 1
                continue
            raise NotPreloadable(f"python option {arg} cannot be preloaded")
        if arg == "-" or arg.startswith("--"):
            raise NotPreloadable(f"python {arg} cannot be preloaded")
        script = os.path.join(cwd, arg)
        if not os.path.isfile(script):
            raise NotPreloadable(f"python script {arg!r} is not a file in {cwd}")
        # As typed: the worker runs in cwd, and Python shows the script's name so.
        return Plan(interpreter, tuple(flags), EntryKind.PATH, arg, (arg, *args[i + 1 :]))
    raise NotPreloadable("python without -m MODULE or a script (an interactive interpreter)")


def _shebang_python(program: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """The interpreter and options a script's shebang names; NotPreloadable if not Python."""
    try:
        with open(program, "rb") as f:
            head = f.read(_SHEBANG_READ)
    except OSError as exc:
        raise NotPreloadable(f"cannot read {program}: {exc.strerror}") from None
    if not head.startswith(b"#!"):
        raise NotPreloadable(f"{program} is not a script with a #! line (a binary?)")
    lines = head.decode("utf-8", "replace").splitlines()
    words = lines[0][2:].split(None, 1)
    if not words:
        raise NotPreloadable(f"{program} has an empty #! line")
    interp, optional = words[0], (words[1] if len(words) > 1 else "")
    flags = optional.split()
    base = os.path.basename(interp)
    if base == "env":
        parts = [p for p in flags if p != "-S"]
        if not parts or parts[0].startswith("-"):
            raise NotPreloadable(f"{program}: #!{lines[0][2:]} is not understood")
        found = resolve_program(parts[0], "/", env)
        if found is None:
            raise NotPreloadable(f"{program}: {parts[0]!r} is not on PATH")
        interp, flags = found, parts[1:]
    elif base in ("sh", "bash") and len(lines) > 1 and lines[1].startswith("'''exec'"):
        # pip/distlib's trampoline for interpreter paths too long for #!.
        try:
            words = shlex.split(lines[1])
        except ValueError:
            raise NotPreloadable(f"{program}: the exec trampoline is not understood") from None
        if len(words) < 2:
            raise NotPreloadable(f"{program}: the exec trampoline is not understood")
        interp, flags = words[1], []
    if not is_python_name(interp):
        raise NotPreloadable(f"{program} runs {interp}, not Python")
    if not (os.path.isfile(interp) and os.access(interp, os.X_OK)):
        raise NotPreloadable(f"{program}: interpreter {interp} is not an executable file")
    if any(not (f.startswith("-") and all(c in _SIMPLE_FLAGS for c in f[1:])) for f in flags):
        raise NotPreloadable(f"{program}: interpreter options {' '.join(flags)} not supported")
    return interp, flags
