#!/usr/bin/env bash
# The whole story on one machine: a lab of 3 real hosts + a balancer, deploy, status, and a question about an image.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
LAB=${LAB_DIR:-$PWD/.lab}
L=.venv/bin/llamactl
$L lab down --dir "$LAB" >/dev/null 2>&1 || true
$L lab up 3 --dir "$LAB" ${LAB_BALANCERS:+--balancers "$LAB_BALANCERS"}   # LAB_BALANCERS=2: two balancers, one VIP
$L validate "$LAB/inventory.yaml"
$L deploy "$LAB/inventory.yaml"
$L status "$LAB/inventory.yaml"
.venv/bin/python - "$LAB/photo.jpg" <<'PY'
import sys
from PIL import Image, ImageDraw
img = Image.new("RGB", (640, 480), (40, 90, 160))
d = ImageDraw.Draw(img)
d.ellipse((220, 140, 420, 340), fill=(250, 200, 40))
d.rectangle((0, 380, 640, 480), fill=(30, 140, 60))
img.save(sys.argv[1], quality=90)
PY
$L infer "$LAB/photo.jpg" --endpoint "$(cat "$LAB/endpoint")" --question "What is in this picture?"
echo
# Where to look: Prometheus on the balancer host (inventory `prometheus:`), its targets, rules and alerts.
.venv/bin/python - "$LAB/inventory.yaml" <<'PY'
import sys
from llamactl.inventory import load_inventory
from llamactl.plan.prometheus import url
inv = load_inventory(sys.argv[1])
if inv.prometheus is not None:
    for lb in inv.balancer.hosts:
        base = url(inv.prometheus, lb.address)
        print(f"Prometheus on {lb.name}: {base}  (targets: {base}/targets, alerts: {base}/alerts, "
              f"API: curl -s {base}/api/v1/targets)")
    if inv.health.alerts.enabled:
        print(f"Rules it loads: {inv.health.alerts.rules_path} on the balancer host; Grafana dashboard to import: "
              f"{inv.health.alerts.dashboard_path} there (or `llamactl render` locally)")
PY
echo "The balancer's own figures (nginx active connections, req/s) are the 'balancer' lines of status above."
echo "The lab is still up: try 'llamactl status $LAB/inventory.yaml --watch' (sparklines of req/s and p95) (activate with: . .venv/bin/activate)."
echo "Tear it down with: .venv/bin/llamactl lab down --dir $LAB"
