"""scripts/install-packages in the situations a fresh machine puts it in (stub apt-get)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "install-packages"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="installs as root only")

# A stand-in for apt-get: logs its arguments; `install PKG` makes the command
# PKG provides appear (or fails for packages named in STUB_BROKEN); it also
# records whether the policy file existed while it ran.
STUB = """#!/bin/sh
echo "$*" >> "$STUB_LOG"
[ -e "$POLICY_RC" ] && echo "policy present" >> "$STUB_LOG"
[ "$1" = update ] && exit 0
shift
for arg in "$@"; do
    case "$arg" in -*) continue ;; esac
    for broken in $STUB_BROKEN; do [ "$arg" = "$broken" ] && exit 100; done
    printf '#!/bin/sh\\n' > "$STUB_BIN/$arg-cmd" && chmod +x "$STUB_BIN/$arg-cmd"
done
exit 0
"""


def _run(tmp_path: Path, *pairs: str, broken: str = "") -> subprocess.CompletedProcess[str]:
    stub_bin = tmp_path / "bin"
    stub_bin.mkdir(exist_ok=True)
    apt = stub_bin / "apt-get"
    apt.write_text(STUB)
    apt.chmod(apt.stat().st_mode | stat.S_IXUSR)
    env = {
        **os.environ,
        "PATH": f"{stub_bin}:/usr/bin:/bin",
        "APT_GET": str(apt),
        "POLICY_RC": str(tmp_path / "policy-rc.d"),
        "STUB_LOG": str(tmp_path / "apt.log"),
        "STUB_BIN": str(stub_bin),
        "STUB_BROKEN": broken,
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *pairs], env=env, capture_output=True, text=True, timeout=30
    )


def test_existing_policy_file_and_a_package_to_install_exits_0(tmp_path: Path) -> None:
    """The case that broke the README: policy-rc.d already there, a package to install."""
    policy = tmp_path / "policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n# the image's own\n")
    result = _run(tmp_path, "fakepkg:fakepkg-cmd")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "bin" / "fakepkg-cmd").exists()
    assert policy.read_text().endswith("# the image's own\n")  # left alone


def test_policy_file_is_made_for_the_install_and_removed_after(tmp_path: Path) -> None:
    """Without a policy file, one exists while apt-get runs and is gone afterwards."""
    result = _run(tmp_path, "fakepkg:fakepkg-cmd")
    assert result.returncode == 0, result.stderr
    assert "policy present" in (tmp_path / "apt.log").read_text()
    assert not (tmp_path / "policy-rc.d").exists()


def test_nothing_missing_runs_no_apt_get(tmp_path: Path) -> None:
    """Commands that are there already cost nothing (no apt-get update)."""
    result = _run(tmp_path, "coreutils:ls")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "apt.log").exists()


def test_a_package_that_fails_is_named_and_the_others_still_install(tmp_path: Path) -> None:
    """One broken package: exit 1 naming it; the other one is installed anyway."""
    result = _run(tmp_path, "goodpkg:goodpkg-cmd", "badpkg:badpkg-cmd", broken="badpkg")
    assert result.returncode == 1
    assert "could not install: badpkg (for badpkg-cmd)" in result.stderr
    assert (tmp_path / "bin" / "goodpkg-cmd").exists()
    assert not (tmp_path / "policy-rc.d").exists()


def test_install_rejects_unknown_options() -> None:
    """scripts/install takes nothing or --tests; anything else is a usage error (2)."""
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install"), "--bogus"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "unknown option --bogus" in result.stderr
