"""llamactl.remote: the edge where commands and files reach hosts.

``Executor`` is the protocol; ``llamactl.remote.ssh.connect`` gives the paramiko implementation
(imported separately so that importing this package does not load paramiko).
"""

from llamactl.remote.base import CommandTimeout, Executor, RemoteFileError, RunResult
from llamactl.remote.local import LocalExecutor
from llamactl.remote.parallel import Err, Ok, TaskResult, run_parallel
from llamactl.remote.recording import FakeFile, Recorded, RecordingExecutor, Reply

__all__ = [
    "CommandTimeout",
    "Err",
    "Executor",
    "FakeFile",
    "LocalExecutor",
    "Ok",
    "Recorded",
    "RecordingExecutor",
    "RemoteFileError",
    "Reply",
    "RunResult",
    "TaskResult",
    "run_parallel",
]
