#!/usr/bin/env bash
# Makes sure Debian's Chromium and ChromeDriver are installed, for the web page's
# end-to-end test (tests/tests/browser.rs). Idempotent.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
echo "browser    not installed; installing chromium chromium-driver (apt-get)"
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
command -v chromium >/dev/null && command -v chromedriver >/dev/null
