#!/usr/bin/env bash
# Installs headless Chromium and its WebDriver for the dashboard browser test
# (tests/tests/dashboard.rs). Idempotent: does nothing when both are already there.
# Debian/Ubuntu names; apt-get needs root or sudo.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1; }
if have chromium && have chromedriver; then
    echo "chromium and chromedriver already installed: $(chromium --version 2>/dev/null || true)"
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core
chromium --version
chromedriver --version
