#!/usr/bin/env bash
# Set up (first run only) and run the default test suite (slow tests: add `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The dashboard's browser test drives Debian's chromium; on a clean machine (as root) install it, and where
# that fails the test skips and says why.
if ! command -v chromedriver >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
    || echo "could not install chromium + chromium-driver: the dashboard browser test will be skipped" >&2
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check src tests benchmarks
exec .venv/bin/python -m pytest "$@"
