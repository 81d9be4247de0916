"""Reading a host's state: one command (a small Python script) and a pure parser of its JSON output.

One round trip per host gathers everything deploy needs to decide what to change, which is what
makes a no-op redeploy fast. The script sticks to Python 3.6 syntax so an old interpreter can still
report its own version instead of failing with a SyntaxError.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from llamactl.plan.command import Command

GATHER_SCRIPT = r"""
import hashlib, json, os, shutil, subprocess, sys
args = json.loads(sys.argv[1])
def sha(path):
    try:
        h = hashlib.sha256()
        with open(path, 'rb') as f:
            for chunk in iter(lambda: f.read(1 << 20), b''):
                h.update(chunk)
        return h.hexdigest()
    except (IOError, OSError):
        return None
def run(argv):
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=20)
        return p.returncode, p.stdout.decode('utf-8', 'replace')
    except (OSError, subprocess.SubprocessError):
        return None, ''
out = {'python': list(sys.version_info[:3])}
try:
    import venv, ensurepip
    out['venv'] = True
except ImportError:
    out['venv'] = False
probe = args['install_dir']
while probe and not os.path.exists(probe):
    probe = os.path.dirname(probe)
try:
    out['free_bytes'] = shutil.disk_usage(probe or '/').free
except OSError:
    out['free_bytes'] = None
out['systemd'] = os.path.isdir('/run/systemd/system')
out['user_exists'] = None
if args.get('user'):
    import pwd
    try:
        pwd.getpwnam(args['user'])
        out['user_exists'] = True
    except KeyError:
        out['user_exists'] = False
out['files'] = dict((p, sha(p)) for p in args['files'])
out['wheelhouse'] = {}
wh = args['wheelhouse_dir']
if os.path.isdir(wh):
    for name in os.listdir(wh):
        out['wheelhouse'][name] = os.path.getsize(os.path.join(wh, name))
rel = os.path.join(args['install_dir'], 'releases')
out['releases'] = sorted(n for n in os.listdir(rel) if os.path.exists(os.path.join(rel, n, '.complete'))) if os.path.isdir(rel) else []
hist = os.path.join(rel, '.history')
out['history'] = [l.strip() for l in open(hist) if l.strip()] if os.path.exists(hist) else []
envdir = args.get('env_dir')
out['env_files'] = sorted(os.path.join(envdir, n) for n in os.listdir(envdir) if n.startswith('instance-') and n.endswith('.env')) if envdir and os.path.isdir(envdir) else []
cur = os.path.join(args['install_dir'], 'current')
out['current'] = os.path.basename(os.readlink(cur)) if os.path.islink(cur) else None
manifest = args.get('model_manifest')
out['model_manifest'] = None
if manifest and os.path.exists(manifest):
    try:
        with open(manifest) as f:
            out['model_manifest'] = json.load(f)
    except (IOError, OSError, ValueError):
        pass
out['model_present'] = os.path.exists(args['model_path']) if args.get('model_path') else None
units = args['units']
out['units'] = {}
if units and out['systemd']:
    rc, text = run(['systemctl', 'show', '-p', 'Id,ActiveState,UnitFileState,ActiveEnterTimestampMonotonic'] + units)
    for block in text.strip().split('\n\n'):
        kv = dict(line.split('=', 1) for line in block.splitlines() if '=' in line)
        if kv.get('Id'):
            out['units'][kv['Id']] = {'active': kv.get('ActiveState', ''), 'enabled': kv.get('UnitFileState', '')}
if args.get('gpus'):
    rc, text = run(['nvidia-smi', '--query-gpu=index', '--format=csv,noheader'])
    out['gpu_count'] = len([l for l in text.splitlines() if l.strip()]) if rc == 0 else None
print(json.dumps(out))
"""


@dataclass(frozen=True)
class UnitState:
    active: str
    enabled: str


@dataclass(frozen=True)
class HostFacts:
    python: tuple[int, int, int]
    venv: bool
    free_bytes: int | None
    systemd: bool
    files: dict[str, str | None]
    wheelhouse: dict[str, int]
    releases: list[str]
    current: str | None
    model_manifest: dict[str, Any] | None
    model_present: bool | None
    units: dict[str, UnitState] = field(default_factory=dict)
    gpu_count: int | None = None
    history: list[str] = field(default_factory=list)
    env_files: list[str] = field(default_factory=list)
    user_exists: bool | None = None


def gather_command(
    python: str,
    *,
    install_dir: str,
    files: list[str],
    wheelhouse_dir: str,
    units: list[str],
    model_path: str | None,
    model_manifest: str | None,
    gpus: bool,
    env_dir: str = "/etc/llamactl",
    user: str | None = None,
) -> Command:
    args = {
        "user": user,
        "env_dir": env_dir,
        "install_dir": install_dir,
        "files": files,
        "wheelhouse_dir": wheelhouse_dir,
        "units": units,
        "model_path": model_path,
        "model_manifest": model_manifest,
        "gpus": gpus,
    }
    return Command((python, "-c", GATHER_SCRIPT, json.dumps(args, sort_keys=True)), "gather host facts")


class FactsError(ValueError):
    pass


def parse_facts(stdout: str) -> HostFacts:
    """Parse the gather script's output; raises FactsError on anything unexpected."""
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    if not lines:
        raise FactsError("the fact-gathering script printed nothing")
    try:
        raw = json.loads(lines[-1])
        units = {k: UnitState(v["active"], v["enabled"]) for k, v in raw.get("units", {}).items()}
        py = raw["python"]
        return HostFacts(
            python=(int(py[0]), int(py[1]), int(py[2])),
            venv=bool(raw["venv"]),
            free_bytes=raw.get("free_bytes"),
            systemd=bool(raw["systemd"]),
            files=dict(raw["files"]),
            wheelhouse={str(k): int(v) for k, v in raw["wheelhouse"].items()},
            releases=list(raw["releases"]),
            current=raw.get("current"),
            model_manifest=raw.get("model_manifest"),
            model_present=raw.get("model_present"),
            units=units,
            gpu_count=raw.get("gpu_count"),
            history=[str(x) for x in raw.get("history", [])],
            env_files=[str(x) for x in raw.get("env_files", [])],
            user_exists=raw.get("user_exists"),
        )
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise FactsError(f"unexpected output from the fact-gathering script: {lines[-1][:200]!r}") from exc
