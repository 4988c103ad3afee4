#!/usr/bin/env bash
# Installs what the etcd store backend needs: protoc (protobuf-compiler) to build the
# etcd client's gRPC code, and a real etcd (Debian's etcd-server, 3.4) for the store
# conformance suite, the election tests and the multi-controller tests. Idempotent.
# Debian's package starts an etcd service on 2379; the tests start their own members on
# free ports, so that service is stopped and disabled when this script installs it.
# Usage: scripts/deps-etcd.sh   (apt-get needs root or sudo)
set -euo pipefail

packages=(protobuf-compiler etcd-server)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "etcd deps: all installed (${packages[*]})"
    exit 0
fi
sudo_=()
[ "$(id -u)" -eq 0 ] || sudo_=(sudo)
"${sudo_[@]}" apt-get update -qq
# No service started by the package: tests run their own etcd members. A policy the
# machine already has is left as it is.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo_[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${sudo_[@]}" chmod +x /usr/sbin/policy-rc.d
    trap '"${sudo_[@]}" rm -f /usr/sbin/policy-rc.d' EXIT
fi
DEBIAN_FRONTEND=noninteractive "${sudo_[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
command -v protoc >/dev/null || { echo "error: protoc missing after installing protobuf-compiler" >&2; exit 1; }
command -v etcd >/dev/null || { echo "error: etcd missing after installing etcd-server" >&2; exit 1; }
echo "etcd deps: installed ${missing[*]} ($(etcd --version | head -1))"
