"""The host side of a deploy's fan-out: serve files to peers, fetch files from peers. Standard library only.

The controller runs this file's source on a host with ``python3 -c SOURCE serve|fetch`` and passes the
settings as JSON on stdin (the token never appears in argv, where other users could read it):

- ``serve``: bind an HTTP server to the host's inventory address (an ephemeral port), print
  ``{"port", "pid"}`` and detach. It answers ``GET /<sha256>`` only with ``Authorization: Bearer <token>``
  and only for the files it was given; it exits after ``ttl_s`` or when killed.
- ``fetch``: for each item, keep the file at ``dest`` if it already has the digest; else move a file the
  controller staged, or download from each peer in turn, hashing on the way; a file is renamed into place
  only once its sha256 matches. Prints one JSON result per item.
"""

from __future__ import annotations  # the hosts' python3 may predate `X | None` at run time

import hashlib
import hmac
import json
import os
import socket
import sys
import threading
import time
import urllib.request
from typing import Any

CHUNK = 1 << 20
PART = ".llamactl-part"


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def serve(cfg: dict[str, Any]) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    token = cfg["token"].encode()
    files = dict(cfg["files"])
    rate = float(cfg.get("rate_bytes_s") or 0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            given = self.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, b"Bearer " + token):
                self.send_error(403)
                return
            path = files.get(self.path.lstrip("/"))
            if not path or not os.path.isfile(path):
                self.send_error(404)
                return
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                if not rate:
                    self.connection.sendfile(f)
                    return
                start, sent = time.monotonic(), 0
                for chunk in iter(lambda: f.read(CHUNK // 4), b""):
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    ahead = sent / rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)

        def log_message(self, format: str, *args: Any) -> None:  # the base class names it so
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in cfg["bind"] else socket.AF_INET

    server = Server((cfg["bind"], 0), Handler)
    pid = os.fork()
    if pid:
        print(json.dumps({"port": server.server_address[1], "pid": pid}), flush=True)
        os._exit(0)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # let the SSH channel close: nothing of ours holds its pipes
        os.dup2(null, fd)
    timer = threading.Timer(float(cfg.get("ttl_s", 1800)), server.shutdown)
    timer.daemon = True
    timer.start()
    server.serve_forever()
    os._exit(0)


def _download(url: str, token: str, dest_tmp: str, timeout_s: float) -> tuple[str, int]:
    req = urllib.request.Request(url, headers={"Authorization": "Bearer " + token})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # peers: never through a proxy
    h = hashlib.sha256()
    n = 0
    with opener.open(req, timeout=timeout_s) as resp, open(dest_tmp, "wb") as out:
        for chunk in iter(lambda: resp.read(CHUNK), b""):
            out.write(chunk)
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _place(tmp: str, item: dict[str, Any]) -> None:
    os.chmod(tmp, int(item["mode"]))
    os.replace(tmp, item["dest"])


def fetch_one(item: dict[str, Any], timeout_s: float, dead: set[str] | None = None) -> dict[str, Any]:
    """``dead``: peers that already failed in this run are not tried again (a firewalled or killed peer
    would otherwise cost a timeout per file)."""
    dead = set() if dead is None else dead
    dest = item["dest"]
    out = {"dest": dest, "digest": item["digest"], "ok": False, "how": None, "source": None, "bytes": 0,
           "seconds": 0.0, "errors": []}
    started = time.monotonic()
    directory = os.path.dirname(dest)
    try:
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):  # parts left by a fetch that was killed
            if name.startswith(os.path.basename(dest) + PART):
                os.unlink(os.path.join(directory, name))
        if os.path.isfile(dest) and os.path.getsize(dest) == item["size"] and sha256_of(dest) == item["digest"]:
            out.update(ok=True, how="present")
            return out
    except OSError as exc:
        out["errors"].append(f"{dest}: {exc}")
        return out
    staged = item.get("staged")
    if staged:
        try:
            got = sha256_of(staged)
            if got == item["digest"]:
                _place(staged, item)
                out.update(ok=True, how="controller", bytes=item["size"])
            else:
                out["errors"].append(f"controller upload: sha256 {got}, expected {item['digest']}")
                os.unlink(staged)
        except OSError as exc:
            out["errors"].append(f"controller upload: {exc}")
        out["seconds"] = time.monotonic() - started
        return out
    tmp = f"{dest}{PART}-{os.getpid()}"
    for src in item.get("sources", []):
        if src["host"] in dead:
            out["errors"].append(f"{src['host']}: skipped, failed earlier")
            continue
        t0 = time.monotonic()
        try:
            digest, n = _download(src["url"], src["token"], tmp, timeout_s)
            if digest == item["digest"] and n == item["size"]:
                _place(tmp, item)
                out.update(ok=True, how="peer", source=src["host"], bytes=n, seconds=time.monotonic() - t0)
                return out
            out["errors"].append(f"{src['host']}: got {n} bytes with sha256 {digest}")
        except Exception as exc:  # noqa: BLE001 - any failure of one peer: try the next, then the controller
            out["errors"].append(f"{src['host']}: {exc}")
            dead.add(src["host"])
        try:
            os.unlink(tmp)
        except OSError:
            pass
    out["seconds"] = time.monotonic() - started
    return out


def fetch(cfg: dict[str, Any]) -> None:
    timeout_s = float(cfg.get("timeout_s", 10))
    dead: set[str] = set()
    for item in cfg["items"]:
        print(json.dumps(fetch_one(item, timeout_s, dead)), flush=True)


if __name__ == "__main__":
    config = json.loads(sys.stdin.read())
    {"serve": serve, "fetch": fetch}[sys.argv[1]](config)
