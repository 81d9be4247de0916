"""One command's I/O on an SSH exec channel, without deadlocks.

stdout and stderr are drained by two threads while a third feeds stdin, so a command producing
megabytes on both streams, or reading a large stdin before writing, cannot stall against SSH
flow control.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import paramiko

CHUNK = 256 * 1024
# After the exit status arrives, output still in flight gets this long; a background child that
# inherited stdout (``daemon &``) would otherwise keep the channel open forever.
DRAIN_GRACE_S = 1.0


def _drain(recv: Callable[[int], bytes], sink: bytearray) -> None:
    while True:
        try:
            data = recv(CHUNK)
        except (OSError, EOFError, paramiko.SSHException):
            return
        if not data:
            return
        sink += data


def _feed(channel: paramiko.Channel, data: bytes) -> None:
    try:
        channel.sendall(data)
        channel.shutdown_write()
    except (OSError, EOFError, paramiko.SSHException):
        pass  # the command exited without reading all of stdin; its exit code tells the story


def communicate(channel: paramiko.Channel, stdin: bytes | None, wait_s: float | None
                ) -> tuple[int | None, bytes, bytes]:
    """Exit code (None: no exit status within ``wait_s``; the channel is closed), stdout, stderr."""
    out, err = bytearray(), bytearray()
    with channel:
        threads = [threading.Thread(target=_drain, args=(channel.recv, out), daemon=True),
                   threading.Thread(target=_drain, args=(channel.recv_stderr, err), daemon=True)]
        if stdin:
            threads.append(threading.Thread(target=_feed, args=(channel, stdin), daemon=True))
        else:
            channel.shutdown_write()
        for thread in threads:
            thread.start()
        if not channel.status_event.wait(wait_s):
            channel.close()
            for thread in threads:
                thread.join(1.0)
            return None, bytes(out), bytes(err)
        for thread in threads[:2]:
            thread.join(DRAIN_GRACE_S)
        channel.close()  # wakes readers held by a lingering background child
        for thread in threads:
            thread.join()
        return channel.recv_exit_status(), bytes(out), bytes(err)
