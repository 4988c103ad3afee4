#!/usr/bin/env bash
# Builds bramblectl, bramble-controller and bramble-agent and puts them on PATH.
# Usage: scripts/install.sh [--prefix DIR] [--profile release|dev] [--no-build]
#   --prefix    where bin/ is (default: /usr/local as root, ~/.local otherwise)
#   --profile   cargo profile (default: release, what the Pis run)
#   --no-build  install what is built already
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=""
profile="release"
build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
        --profile) profile="${2:?--profile needs release or dev}"; shift 2 ;;
        --no-build) build=0; shift ;;
        -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 64 ;;
    esac
done
case "$profile" in
    release) dir=release ;;
    dev) dir=debug ;;
    *) echo "install.sh: --profile is release or dev, not $profile" >&2; exit 64 ;;
esac
if [ -z "$prefix" ]; then
    if [ "$(id -u)" -eq 0 ]; then prefix=/usr/local; else prefix="$HOME/.local"; fi
fi

if [ "$build" = 1 ]; then
    echo "==> building ($profile); the first release build takes a few minutes"
    cargo build --profile "$profile" --locked --workspace --bins
fi
target="${CARGO_TARGET_DIR:-target}/$dir"
for b in bramblectl bramble-controller bramble-agent; do
    if [ ! -x "$target/$b" ]; then
        echo "install.sh: $target/$b is not built (run without --no-build)" >&2
        exit 1
    fi
done
mkdir -p "$prefix/bin"
for b in bramblectl bramble-controller bramble-agent; do
    install -m 755 "$target/$b" "$prefix/bin/$b"
    echo "installed $prefix/bin/$b"
done
case ":$PATH:" in
    *":$prefix/bin:"*) ;;
    *) echo "note: $prefix/bin is not on PATH; add it: export PATH=\"$prefix/bin:\$PATH\"" ;;
esac
echo "bash completion: source <(bramblectl completion bash)"
