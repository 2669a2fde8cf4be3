#!/usr/bin/env bash
# Builds a Debian package of flypool: dist/flypool_<version>_<arch>.deb.
#
#     bash packaging/deb/build.sh [--outdir DIR]
#
# The package holds a self-contained virtualenv in /opt/flypool (flypool and
# its runtime dependencies, installed from PyPI by pip), /usr/bin/flypool, the
# systemd units and an example /etc/flypool/flypool.toml (a conffile). It uses
# the system's Python, so build it on the Debian release it is meant for: the
# virtualenv's compiled dependencies are for that Python version only.
#
# Needs: dpkg-deb, network access to PyPI (or a pip index with the
# dependencies), and a Python with pip >= 22.3 to build with.
# Environment:
#   PYTHON         builds the wheel and runs pip (default: .venv/bin/python, else python3)
#   TARGET_PYTHON  the interpreter the package runs on (default: /usr/bin/python3)
#   DEB_MAINTAINER the Maintainer field
#   PIP_CONSTRAINT pin the dependencies' versions (pip reads it), for repeatable builds
#
# A virtualenv is not relocatable, so it is created in the staging directory and
# every reference to the staging path is then rewritten to /opt/flypool (script
# shebangs, bin/activate*, pyvenv.cfg). The build fails if any reference is left.
set -euo pipefail
umask 022

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
outdir=$repo/dist
while [ $# -gt 0 ]; do
    case $1 in
        -o | --outdir) outdir=${2:?"$1 needs a directory"}; shift 2 ;;
        --outdir=*) outdir=${1#--outdir=}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "build.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

die() {
    echo "build.sh: $*" >&2
    exit 1
}

if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
TARGET_PYTHON=${TARGET_PYTHON:-/usr/bin/python3}
maintainer=${DEB_MAINTAINER:-flypool maintainers <flypool@localhost>}
prefix=/opt/flypool

command -v dpkg-deb >/dev/null || die "dpkg-deb not found (apt-get install dpkg-dev)"

version=$(sed -n 's/^__version__ = "\([^"]*\)"$/\1/p' "$repo/src/flypool/__init__.py")
[ -n "$version" ] || die "no __version__ in src/flypool/__init__.py"
# PEP 440 to Debian: pre-releases sort before the release with "~" (1.0~rc1 < 1.0).
deb_version=$(sed -E 's/\.?(a|b|rc|dev)([0-9]+)/~\1\2/g' <<<"$version")
[[ $deb_version =~ ^[0-9][A-Za-z0-9.+~-]*$ ]] || die "cannot make a Debian version of $version"
arch=$(dpkg --print-architecture)

# The interpreter, by its versioned name: the venv's bin/python3 links to it, so
# the package keeps working when /usr/bin/python3 moves on to a newer version.
command -v "$TARGET_PYTHON" >/dev/null || die "$TARGET_PYTHON not found"
target=$(readlink -f "$(command -v "$TARGET_PYTHON")")
pyver=$("$target" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
"$target" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$target is Python $pyver, flypool needs >= 3.11"

work=$(mktemp -d "${TMPDIR:-/tmp}/flypool-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
stage=$work/root
venv=$stage$prefix

echo "build.sh: flypool $version ($deb_version, $arch) for Python $pyver" >&2

# --- the wheel ---------------------------------------------------------------
if "$PYTHON" -c 'import build' 2>/dev/null; then
    "$PYTHON" -m build --wheel --outdir "$work/wheel" "$repo" >&2
else
    "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$work/wheel" "$repo" >&2
fi
wheels=("$work"/wheel/flypool-*.whl)
[ ${#wheels[@]} -eq 1 ] && [ -f "${wheels[0]}" ] || die "expected one wheel, got: ${wheels[*]}"

# --- the virtualenv ----------------------------------------------------------
# No pip in it: it is installed by the build Python's pip (--python), so the
# package does not ship a pip that could change package-owned files.
"$target" -m venv --without-pip "$venv"
"$PYTHON" -m pip --python "$venv/bin/python3" install --quiet --no-compile \
    --prefer-binary --no-warn-script-location "${wheels[0]}" >&2

# pip records where the wheel came from (a temporary path): not worth shipping.
for dist_info in "$venv"/lib/python*/site-packages/flypool-*.dist-info; do
    rm -f "$dist_info/direct_url.json"
    sed -i '/\/direct_url\.json,/d' "$dist_info/RECORD"
done

# Rewrite the staging path to /opt/flypool in every text file that has it.
"$target" - "$venv" "$prefix" <<'EOF'
import os, sys

staged, final = (s.encode() for s in sys.argv[1:])
for top, _, files in os.walk(staged):
    for name in files:
        path = os.path.join(top, name)
        if os.path.islink(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if staged in data and b"\0" not in data:
            with open(path, "wb") as f:
                f.write(data.replace(staged, final))
EOF
if left=$(grep -rlF "$stage" "$stage"); then
    die "files still refer to the staging directory: $left"
fi
# Byte-compile with the final paths, so tracebacks name /opt/flypool/... and the
# .pyc files are dpkg's (no stray __pycache__ is left behind on purge).
if ! out=$("$target" -m compileall -q -j 0 -s "$stage" -p / "$venv/lib" 2>&1); then
    die "byte-compiling failed: $out"
fi
# Smoke test: the package imports and runs (the shebangs point at /opt/flypool).
PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python3" -m flypool --version >/dev/null \
    || die "the staged flypool does not run"

# --- configuration, units, command -------------------------------------------
install -D -m 0644 "$repo/packaging/flypool.toml" "$stage/etc/flypool/flypool.toml"
for unit in flypool.service flypool.socket; do
    [ -f "$repo/systemd/$unit" ] || die "missing systemd/$unit"
    install -D -m 0644 "$repo/systemd/$unit" "$stage/lib/systemd/system/$unit"
done
mkdir -p "$stage/usr/bin"
ln -s "$prefix/bin/flypool" "$stage/usr/bin/flypool"

# --- DEBIAN/ -----------------------------------------------------------------
mkdir -p "$stage/DEBIAN"
installed_size=$(du -sk --apparent-size "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<EOF
Package: flypool
Version: $deb_version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: python3 (>= 3.11), python$pyver, util-linux
Section: admin
Priority: optional
Description: process supervisor for web applications
 flypool keeps a pool of application worker processes (gunicorn or any
 server that binds a Unix socket or port) behind one Unix or TCP socket,
 balances requests across them and restarts them one by one without
 dropping a request (rolling restarts), in the spirit of Phusion Passenger.
 .
 This package installs flypool with its dependencies in /opt/flypool, the
 flypool command, systemd units and an example /etc/flypool/flypool.toml.
 The service is not enabled or started on installation.
EOF
echo /etc/flypool/flypool.toml >"$stage/DEBIAN/conffiles"
(cd "$stage" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -print0 \
    | LC_ALL=C sort -z | xargs -0 md5sum | sed 's|  \./|  |') >"$stage/DEBIAN/md5sums"

cat >"$stage/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    # A system user for the daemon's files and sockets; no login, no home.
    if ! getent passwd flypool >/dev/null; then
        if command -v adduser >/dev/null 2>&1; then
            group=--group
            if getent group flypool >/dev/null; then group="--ingroup flypool"; fi
            # shellcheck disable=SC2086
            adduser --system $group --no-create-home --home /nonexistent --quiet flypool
        else
            group=--user-group
            if getent group flypool >/dev/null; then group="--gid flypool"; fi
            # shellcheck disable=SC2086
            useradd --system $group --no-create-home --home-dir /nonexistent \
                --shell /usr/sbin/nologin flypool
        fi
    fi
    # Make the new units known; enabling and starting them is the admin's call.
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null 2>&1 || true
    fi
fi
exit 0
EOF

cat >"$stage/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
# On removal only: an upgrade leaves the running daemon alone (no downtime);
# restart it when convenient, e.g. with a socket-activated restart.
case "$1" in
    remove | deconfigure)
        if [ -d /run/systemd/system ]; then
            systemctl stop flypool.socket flypool.service >/dev/null 2>&1 || true
        fi
        ;;
esac
exit 0
EOF

cat >"$stage/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
case "$1" in
    remove | purge)
        # /opt/flypool is the package's alone: drop anything Python or an admin left.
        rm -rf /opt/flypool
        ;;
esac
if [ "$1" = purge ]; then
    # `systemctl enable` links to units that no longer exist.
    for link in /etc/systemd/system/*.wants/flypool.service \
                /etc/systemd/system/*.wants/flypool.socket; do
        if [ -L "$link" ]; then rm -f "$link"; fi
    done
    rmdir /etc/flypool 2>/dev/null || true
    if getent passwd flypool >/dev/null; then
        if command -v deluser >/dev/null 2>&1; then
            deluser --system --quiet flypool || true
        else
            userdel flypool || true
        fi
    fi
    if getent group flypool >/dev/null; then
        if command -v delgroup >/dev/null 2>&1; then
            delgroup --system --only-if-empty --quiet flypool || true
        else
            groupdel flypool || true
        fi
    fi
fi
if [ "$1" = remove ] || [ "$1" = purge ]; then
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null 2>&1 || true
    fi
fi
exit 0
EOF
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/prerm" "$stage/DEBIAN/postrm"

# --- the package -------------------------------------------------------------
mkdir -p "$outdir"
deb=$(cd "$outdir" && pwd)/flypool_${deb_version}_${arch}.deb
dpkg-deb --build --root-owner-group "$stage" "$deb" >/dev/null
echo "$deb"
