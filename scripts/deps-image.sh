#!/usr/bin/env bash
# Installs what bramble-image and its tests need beyond Rust: e2fsprogs (debugfs reads
# the image's ext4 root; mkfs.ext4 makes the tests' synthetic roots). Idempotent; the
# liblzma for .img.xz is compiled into the binary (xz2's `static` feature), and xz-utils
# is only a convenience for compressing images by hand.
# Usage: scripts/deps-image.sh   (apt-get needs root or sudo)
set -euo pipefail

packages=(e2fsprogs xz-utils)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "image deps: all installed (${packages[*]})"
    exit 0
fi
sudo_=()
[ "$(id -u)" -eq 0 ] || sudo_=(sudo)
"${sudo_[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
echo "image deps: installed ${missing[*]}"
