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
