#!/usr/bin/env bash
# The end-to-end test drives Debian's Chromium through Playwright (never a browser download).
# Install it with apt when it is missing and we are allowed to (root); otherwise the e2e test
# itself reports the problem (it is skipped outside CI, and fails in CI).
set -u
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's chromium for the end-to-end test..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null && exit 0
  echo "warning: apt-get install chromium failed" >&2
else
  echo "note: /usr/bin/chromium is missing and cannot be installed here (needs root + apt);" \
       "the browser test will be skipped outside CI" >&2
fi
exit 0
