#!/usr/bin/env bash
# Rewrite constraints.txt: the exact versions of everything `llamactl[server,dev]` installs.
#   bash scripts/refresh-constraints.sh              # newest versions within pyproject.toml's ranges
#   bash scripts/refresh-constraints.sh --from .venv # the versions an existing venv holds
# Then run `bash scripts/test.sh` (it installs from the new file) and commit constraints.txt if it passes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH=torch==2.13.0  # the local CPU build here; on GPU hosts the same version's CUDA build satisfies it
if [ "${1:-}" = "--from" ]; then
  venv=$2
else
  venv=$(mktemp -d /tmp/llamactl-refresh.XXXXXX)
  trap 'rm -rf "$venv"' EXIT
  echo "refresh: resolving llamactl[server,dev] afresh in $venv"
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip setuptools
  "$venv/bin/python" -m pip install -q "$TORCH"
  "$venv/bin/python" -m pip install -q -e '.[server,dev]'
fi
{
  echo "# The exact versions CI tested: scripts/bootstrap.sh, CI and the lab wheelhouse install with -c constraints.txt."
  echo "# Written by scripts/refresh-constraints.sh ($("$venv/bin/python" --version), $(date -u +%Y-%m-%d)); do not edit by hand."
  "$venv/bin/python" -m pip freeze --all --exclude-editable \
    | grep -v -i -e '^#' -e '^llamactl[=@ ]' -e '^-e ' \
    | sed -E 's/^torch==([0-9.]+)\+[a-z0-9]+$/torch==\1/' \
    | LC_ALL=C sort -f -t= -k1,1
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "refresh: wrote constraints.txt ($(grep -vc '^#' constraints.txt) pins)"
