#!/usr/bin/env bash
# promtool, for the alert-rule tests (tests/unit/test_deploy_files.py): taken from Debian's
# `prometheus` package without installing it (no server, no service, no user), into
# /usr/local/bin. Idempotent: nothing to do when promtool is on PATH already. Needs root
# and apt-get; elsewhere it says so, and those tests skip (with CI=true they fail).
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-promtool: needs root and apt-get; install promtool (Prometheus) yourself" >&2
  exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
chmod 755 "$work" && chown _apt "$work" 2>/dev/null || true  # apt downloads as _apt
cd "$work"
export DEBIAN_FRONTEND=noninteractive
# One `apt-get update` per machine: skip it when the package lists already know the
# package (install-system-deps.sh, run first by `make test`, has just updated them).
if ! apt-cache show prometheus >/dev/null 2>&1; then
  apt-get update -qq
fi
apt-get download -qq prometheus
dpkg-deb -x prometheus_*.deb root
install -m 0755 root/usr/bin/promtool /usr/local/bin/promtool
promtool --version | head -1
