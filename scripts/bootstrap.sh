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
# Installs are pinned by constraints.txt (the versions CI tested; see README "Reproducible installs").
# The stamp holds what the venv was installed from: editing either file reinstalls.
stamp=.venv/.llamactl-installed
want=$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c 'import llamactl, torch, transformers, fastapi, openai' 2>/dev/null; then
  echo "bootstrap: installing llamactl with the server and dev extras (versions from constraints.txt)"
  pinned_pip=$(grep -i '^pip==' constraints.txt | cut -d= -f3)
  if [ "$(.venv/bin/python -m pip --version | cut -d' ' -f2)" != "$pinned_pip" ]; then
    .venv/bin/python -m pip install -q -c constraints.txt --upgrade pip
  fi
  # torch first: the local CPU build satisfies the constraint (2.13.0), so no CUDA build is pulled.
  .venv/bin/python -m pip install -q -c constraints.txt torch
  .venv/bin/python -m pip install -q -c constraints.txt -e '.[server,dev]'
  echo "$want" > "$stamp"
fi
echo "bootstrap: ready ($(.venv/bin/llamactl --version))"
