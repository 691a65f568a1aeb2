#!/usr/bin/env bash
# Installs Debian's chromium for tests/test_label_browser.py when it is missing. Only the distribution's
# package, through apt, as root: playwright drives it from /usr/bin/chromium and never downloads a
# browser of its own (no `playwright install`). Where it cannot be installed, the browser test skips
# and says why; this script then exits 0 so the rest of the suite still runs.
set -uo pipefail
if [ -x /usr/bin/chromium ]; then
    echo "setup_browser: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) already installed"
    exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_browser: chromium is missing and cannot be installed here (needs root and apt-get); the browser test will skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; then
    echo "setup_browser: installed $(/usr/bin/chromium --version 2>/dev/null)"
else
    echo "setup_browser: apt-get could not install chromium; the browser test will skip"
fi
exit 0
