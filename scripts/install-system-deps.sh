#!/usr/bin/env bash
# The Debian packages the integration tests run for real: Postfix (a private instance per
# test session, tests/support/postfix.py), postgrey (its greylisting policy service) and
# Cyrus SASL (saslpasswd2, sasldb). Idempotent: does nothing when all are installed.
# Needs root and the Debian package registry; without them it says so and exits 0, and
# the tests that need these programs skip with that reason.
set -euo pipefail

PACKAGES=(postfix postgrey sasl2-bin libsasl2-modules)

missing=()
for package in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-system-deps: cannot install ${missing[*]} (needs root and apt-get);" \
    "the Postfix relay tests will skip" >&2
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
# "No configuration": the package leaves /etc/postfix/main.cf alone and starts no
# system-wide Postfix; the tests run their own instances with their own configuration.
debconf-set-selections <<'SEEDS'
postfix postfix/main_mailer_type select No configuration
postfix postfix/mailname string localhost
SEEDS

echo "install-system-deps: installing ${missing[*]}" >&2
if ! apt-get update -qq || ! apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; then
  echo "install-system-deps: apt-get could not install ${missing[*]};" \
    "the Postfix relay tests will skip" >&2
fi
