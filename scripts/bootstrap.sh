#!/usr/bin/env bash
# Set up everything llamactl's demo and tests need on a Debian machine, as root. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pair in sshd:openssh-server nginx:nginx promtool:prometheus ip:iproute2 unshare:util-linux openssl:openssl \
            ssh-keygen:openssh-client systemd-analyze:systemd sudo:sudo; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || need_apt+=("${pair#*:}")
done
/usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "bootstrap: installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The image's policy-rc.d keeps the packages' daemons from starting; we start what we need ourselves.

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import llamactl, torch, transformers, fastapi, openai' 2>/dev/null; then
  echo "bootstrap: installing llamactl with the server and dev extras"
  .venv/bin/python -m pip install -q --upgrade pip
  # Pin torch first: the local CPU build satisfies the server extra's range, so no CUDA build is pulled.
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e '.[server,dev]'
fi
echo "bootstrap: ready ($(.venv/bin/llamactl --version))"
