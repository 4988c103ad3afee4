#!/usr/bin/env bash
# Builds the test image `bramble-testimg:latest` from this repository: a static binary
# in a FROM-scratch image, so no registry is needed. manifests/hello.yaml runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
target="$(uname -m)-unknown-linux-musl"
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
cargo build --release -p bramble-testimg --target "$target"
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
cp "target/$target/release/testimg" "$ctx/testimg"
printf 'FROM scratch\nCOPY testimg /testimg\nENTRYPOINT ["/testimg"]\n' >"$ctx/Dockerfile"
docker build -q -t bramble-testimg:latest "$ctx"
echo "built bramble-testimg:latest"
