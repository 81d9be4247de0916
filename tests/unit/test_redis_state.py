"""What ``status`` shows of Redis: the command run for real against a real redis-server (password read from
the rendered config), parsed; and the parser on captured output of a Redis that is down."""

from __future__ import annotations

from pathlib import Path

import redis

from llamactl.health.redis_state import parse_state, state_command
from llamactl.remote.local import LocalExecutor
from tests.redis_support import running
from tests.unit.test_plan_redis import PASSWORD, rendered


def test_state_of_a_real_redis(tmp_path: Path) -> None:
    (tmp_path / "srv").mkdir()
    with running(tmp_path / "srv", PASSWORD) as server:
        inv = rendered(tmp_path, port=server.port)
        raw = redis.Redis.from_url(server.url, decode_responses=True)
        raw.xgroup_create("llamactl:jobs", "servers", id="0", mkstream=True)
        for i in range(3):
            raw.xadd("llamactl:jobs", {"id": f"job-{i}"})
        raw.xreadgroup("servers", "host-a/0", {"llamactl:jobs": ">"}, count=1)
        raw.hset("llamactl:usage:alice", mapping={"requests": 7, "rejected": 2, "prompt_tokens": 70,
                                                  "completion_tokens": 35})
        raw.close()
        cmd = state_command(inv, keys=True)
        assert PASSWORD not in cmd.shell()
        state = parse_state("lb-01", LocalExecutor().run(cmd).stdout)
        assert state.answers and state.error is None
        assert (state.backlog, state.claimed, state.cache_bytes) == (3, 1, 0)
        assert state.used_memory and state.used_memory > 0 and state.maxmemory == 0  # the test config sets none
        assert state.usage == {"alice": {"requests": 7, "rejected": 2, "prompt_tokens": 70,
                                         "completion_tokens": 35}}
        assert "jobs backlog 3 (1 claimed)" in state.line()


def test_a_redis_that_does_not_answer() -> None:
    captured = ("unit=failed\nping=Could not connect to Redis at 127.0.0.1:6379: Connection refused\n"
                "backlog=\nclaimed=\ncache_bytes=\n")
    state = parse_state("lb-01", captured)
    assert not state.answers and state.unit == "failed"
    assert state.line() == ("redis on lb-01: DOWN (unit failed): Could not connect to Redis at 127.0.0.1:6379: "
                            "Connection refused")
    assert state.to_dict()["answers"] is False
