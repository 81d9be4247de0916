#!/usr/bin/env bash
# Set up and run the whole test suite (unit, server, render, remote, lab end-to-end). Needs root for the lab.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
