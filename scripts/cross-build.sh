#!/usr/bin/env bash
# Cross-builds bramble-agent, bramble-controller and the static bramble-gate for the Pi,
# without Docker:
#   aarch64-unknown-linux-gnu      Raspberry Pi OS 64-bit, Ubuntu Server for Pi
#   armv7-unknown-linux-gnueabihf  Raspberry Pi OS 32-bit (armhf)
# Binaries land in target/<triple>/{debug,release}/. Prints their stripped sizes at the end.
#
# Usage: scripts/cross-build.sh [--release] [--controller-dev]
#   --controller-dev  builds the controller in the dev profile even with --release: the Arm
#                     test only runs its --version, and two LTO builds of it cost CI ~10 min.
#
# What it installs (idempotently; apt-get needs root or sudo):
#   - the rustup targets; if rustup cannot fetch them, Debian's cross std packages
#     (libstd-rust-dev-arm64 / -armhf), which only fit Debian's own rustc (see below);
#   - Debian's gcc-aarch64-linux-gnu and gcc-arm-linux-gnueabihf with their libc, used as
#     linkers and as C compilers for ring and for rusqlite's bundled SQLite;
#   - protobuf-compiler (protoc), for the controller's etcd client.
#
# Why environment variables and not a committed .cargo/config.toml: the linker and CC
# settings are only needed here, and a config file would make every developer's
# `cargo build --target …` depend on Debian's cross gcc being installed under these names.
# `cross` users (Docker) have Cross.toml instead.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=debug
cargo_profile=()
controller_dev=
for arg in "$@"; do
    case "$arg" in
        --release) profile=release; cargo_profile=(--release) ;;
        --controller-dev) controller_dev=1 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "usage: scripts/cross-build.sh [--release] [--controller-dev] (unknown argument: $arg)" >&2; exit 64 ;;
    esac
done
controller_profile="$profile"
controller_cargo_profile=("${cargo_profile[@]}")
if [ -n "$controller_dev" ]; then
    controller_profile=debug
    controller_cargo_profile=()
fi

targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
# Where the cross builds go (scripts/test.sh gives them their own directory, so they can
# build while the host's tests hold the workspace's target directory).
cross_dir="${BRAMBLE_CROSS_DIR:-target}"
declare -A gnu=([aarch64-unknown-linux-gnu]=aarch64-linux-gnu [armv7-unknown-linux-gnueabihf]=arm-linux-gnueabihf)
declare -A debarch=([aarch64-unknown-linux-gnu]=arm64 [armv7-unknown-linux-gnueabihf]=armhf)

step() { printf '\n==> %s\n' "$*"; }
die() { echo "error: $*" >&2; exit 1; }

sudo_=()
[ "$(id -u)" -eq 0 ] || sudo_=(sudo)
apt_updated=
# Installs the Debian packages given that are not installed yet.
apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} by hand"
    if [ -z "$apt_updated" ]; then
        "${sudo_[@]}" apt-get update -qq
        apt_updated=1
    fi
    echo "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive "${sudo_[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
}

# True if this rustc has a standard library for target $1 (compiles an empty crate).
has_std() {
    local out
    out="$(mktemp -d)"
    if echo 'pub fn probe() {}' | rustc --edition 2021 --target "$1" --crate-type rlib --crate-name probe --out-dir "$out" - >/dev/null 2>&1; then
        rm -rf "$out"; return 0
    fi
    rm -rf "$out"; return 1
}

step "C cross toolchains"
# protoc: the controller's etcd client is generated from etcd's protobuf at build time.
apt_install gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf libc6-dev-arm64-cross libc6-dev-armhf-cross protobuf-compiler

step "Rust targets"
for t in "${targets[@]}"; do
    has_std "$t" && { echo "$t: installed"; continue; }
    if command -v rustup >/dev/null && rustup target add "$t"; then
        continue
    fi
    # Debian's cross std is built for Debian's rustc; it is no use to a rustup toolchain
    # of another version (rustc rejects it with E0514), which has_std finds out.
    echo "rustup could not add $t; falling back to Debian's libstd-rust-dev-${debarch[$t]}"
    apt_install "libstd-rust-dev-${debarch[$t]}"
    has_std "$t" || die "no Rust standard library for $t: rustup could not fetch it, and Debian's libstd-rust-dev-${debarch[$t]} fits only Debian's rustc ($(rustc --version) is in use)"
done

for t in "${targets[@]}"; do
    step "build $t ($profile)"
    triple_env="$(echo "$t" | tr 'a-z-' 'A-Z_')"
    cc_env="$(echo "$t" | tr '-' '_')"
    # The linker, and the C compiler and archiver for build scripts (ring, and rusqlite's
    # bundled SQLite in the controller).
    export "CARGO_TARGET_${triple_env}_LINKER=${gnu[$t]}-gcc"
    export "CC_${cc_env}=${gnu[$t]}-gcc"
    export "AR_${cc_env}=${gnu[$t]}-ar"
    # Separately: built together, cargo unifies their dependencies' features, and the
    # agent would carry the controller's (the etcd client's HTTP/2, ~0.6 MB) for nothing.
    CARGO_TARGET_DIR="$cross_dir" cargo build ${cargo_profile[@]+"${cargo_profile[@]}"} --locked --target "$t" -p bramble-agent
    CARGO_TARGET_DIR="$cross_dir" cargo build ${controller_cargo_profile[@]+"${controller_cargo_profile[@]}"} --locked --target "$t" -p bramble-controller
    # The cron gate runs inside containers of any image, FROM scratch ones too: linked
    # statically (glibc's static libc suffices: it needs no NSS). In a directory of its
    # own, as the flag changes every dependency's build; then put beside the agent, where
    # the agent and bramble-image look for it.
    RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$cross_dir/static" \
        cargo build ${cargo_profile[@]+"${cargo_profile[@]}"} --locked --target "$t" -p bramble-gate
    install -m 755 "$cross_dir/static/$t/$profile/bramble-gate" "$cross_dir/$t/$profile/bramble-gate"
done

step "binary sizes (stripped)"
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
printf '%-32s %-20s %-8s %12s %9s\n' target binary profile bytes MiB
for t in "${targets[@]}"; do
    for b in bramble-agent bramble-controller bramble-gate; do
        p="$profile"
        [ "$b" = bramble-controller ] && p="$controller_profile"
        bin="$cross_dir/$t/$p/$b"
        [ -f "$bin" ] || die "$bin was not built"
        # Release builds are stripped by the profile already; debug builds are measured
        # on a stripped copy so the figures compare.
        "${gnu[$t]}-strip" -o "$tmp" "$bin"
        size="$(stat -c %s "$tmp")"
        printf '%-32s %-20s %-8s %12d %9.2f\n' "$t" "$b" "$p" "$size" "$(awk "BEGIN { print $size / 1048576 }")"
    done
done
