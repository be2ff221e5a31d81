#!/usr/bin/env bash
# Install the project and its test tools into the current Python (a fresh machine has nothing).
# torch/torchvision are pinned per architecture to the builds this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
case "$(uname -m)" in
  x86_64)  TORCH="torch==2.14.1 torchvision==0.29.1" ;;
  aarch64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
  *)       TORCH="torch torchvision" ;;
esac
python -m pip install -q $TORCH
python -m pip install -q -e '.[test]'
# DVC needs a git repository; a tarball checkout gets one
git rev-parse --git-dir >/dev/null 2>&1 || git init -q
# A headless browser for the report's layout test (tests/test_report_browser.py, skipped without one): only as root
# with apt, and never fatal
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (timeout 600 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq \
     --no-install-recommends chromium fonts-dejavu-core) >/dev/null 2>&1 \
    || echo "install.sh: chromium not installed (apt failed): the report's browser test will be skipped" >&2
fi
