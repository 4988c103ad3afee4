#!/usr/bin/env bash
# Runs Bramble's whole test suite, installing what it needs first.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
# Free disk where the build lives, so a run that fills it says so in its log.
disk() { df -h . | awk 'NR==2 {print "disk: " $4 " free of " $2}'; }

step "toolchain"
rustup component add rustfmt clippy >/dev/null 2>&1 || echo "note: could not add rustfmt/clippy via rustup; using what is installed"
# The test image is a fully static binary, so it runs in a FROM-scratch container.
musl="$(uname -m)-unknown-linux-musl"
if ! rustup target list --installed | grep -qx "$musl"; then
    rustup target add "$musl"
fi

step "system packages"
# Network namespaces for the multi-node harness (iptables lets namespaces on a test
# bridge reach each other and cuts a controller off), debugfs for bramble-image,
# headless Chromium for the dashboard test, protoc and etcd for the etcd store. Each
# script is idempotent.
net_missing=()
command -v ip >/dev/null 2>&1 || net_missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || net_missing+=(iptables)
if [ ${#net_missing[@]} -gt 0 ]; then
    sudo_=(); [ "$(id -u)" -eq 0 ] || sudo_=(sudo)
    "${sudo_[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_[@]}" apt-get install -y -qq "${net_missing[@]}" >/dev/null
fi
scripts/deps-image.sh
scripts/deps-browser.sh
scripts/deps-etcd.sh

step "docker"
if ! docker info >/dev/null 2>&1; then
    echo "error: the Docker Engine is not reachable (docker info failed); the runtime and cluster tests need it" >&2
    exit 1
fi
docker version --format 'engine {{.Server.Version}} (API {{.Server.APIVersion}})'

disk
step "format"
cargo fmt --all -- --check

disk
step "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings

disk
step "build"
cargo build --workspace --bins --locked

disk
step "test"
# The Arm step's cross builds (minutes of compiling) run meanwhile, at the lowest CPU and
# I/O priority: the tests mostly wait on Docker and timers, and keep the CPU when they
# need it. Their own target directory keeps them off the tests' build lock.
cross_pid=
if [ "${BRAMBLE_SKIP_ARM:-0}" != 1 ]; then
    export BRAMBLE_CROSS_DIR="$PWD/target/cross"
    mkdir -p "$BRAMBLE_CROSS_DIR"
    lowest=(nice -n 19)
    command -v ionice >/dev/null 2>&1 && lowest+=(ionice -c 3)
    # Its own process group, so that a failed run stops every cargo and rustc of it.
    setsid "${lowest[@]}" scripts/cross-build.sh --release --controller-dev >"$BRAMBLE_CROSS_DIR/build.log" 2>&1 &
    cross_pid=$!
    trap '[ -n "$cross_pid" ] && kill -- "-$cross_pid" 2>/dev/null' EXIT
    echo "cross builds started in the background (log: $BRAMBLE_CROSS_DIR/build.log)"
fi
cargo test --workspace --locked --no-fail-fast "$@"

disk
step "fuzz: every target for ${BRAMBLE_FUZZ_SECS:-10} s (scripts/fuzz.sh)"
# A short bounded run: it catches what a change breaks in the parsers; the long runs
# (scripts/fuzz.sh --runs 10000000) are for a bench session.
scripts/fuzz.sh --secs "${BRAMBLE_FUZZ_SECS:-10}"

disk
if [ "${BRAMBLE_FREE_DISK:-0}" = 1 ]; then
    # Everything but the built binaries, which the Arm step's host controller reuses.
    rm -rf target/debug/deps target/debug/build target/debug/incremental target/debug/.fingerprint target/debug/examples
    disk
fi
# The workspace's binaries are built and current: the Arm step need not build them again.
export BRAMBLE_HOST_BUILT=1
step "arm: cross-build, run under qemu-user, join a controller"
if [ "${BRAMBLE_SKIP_ARM:-0}" = 1 ]; then
    echo "skipped (BRAMBLE_SKIP_ARM=1)"
else
    step "arm: waiting for the cross builds"
    if ! wait "$cross_pid"; then
        cross_pid=
        cat "$BRAMBLE_CROSS_DIR/build.log"
        echo "error: the cross builds failed (log above)" >&2
        exit 1
    fi
    cross_pid=
    tail -n 8 "$BRAMBLE_CROSS_DIR/build.log"
    BRAMBLE_CROSS_BUILT=1 scripts/test-arm.sh
fi
