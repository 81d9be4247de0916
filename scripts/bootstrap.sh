#!/usr/bin/env bash
# Set up everything llamactl's demo and tests need on a Debian machine, as root. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pair in sshd:openssh-server nginx:nginx promtool:prometheus ip:iproute2 unshare:util-linux openssl:openssl \
            ssh-keygen:openssh-client systemd-analyze:systemd sudo:sudo redis-server:redis-server \
            prometheus:prometheus prometheus-nginx-exporter:prometheus-nginx-exporter keepalived:keepalived; do
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
# The stamp holds what the venv was installed from: editing either file reinstalls. pip's own output goes
# to a log, shown only when an install fails.
stamp=.venv/.llamactl-installed
log=.venv/bootstrap-pip.log
want=$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
pip_install() {
  if ! .venv/bin/python -m pip install --progress-bar off -c constraints.txt "$@" >>"$log" 2>&1; then
    echo "bootstrap: \`pip install $*\` failed; the end of $log:" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! .venv/bin/python -c 'import llamactl, torch, transformers, fastapi, openai' 2>/dev/null; then
  : >"$log"
  pinned_pip=$(grep -i '^pip==' constraints.txt | cut -d= -f3)
  if [ "$(.venv/bin/python -m pip --version | cut -d' ' -f2)" != "$pinned_pip" ]; then
    echo "bootstrap: pip $pinned_pip"
    pip_install --upgrade pip
  fi
  # torch first: the local CPU build satisfies the constraint (2.13.0), so no CUDA build is pulled.
  echo "bootstrap: torch (versions from constraints.txt)"
  pip_install torch
  echo "bootstrap: llamactl with the server and dev extras"
  pip_install -e '.[server,dev]'
  echo "$want" > "$stamp"
fi
echo "bootstrap: ready ($(.venv/bin/llamactl --version))"
