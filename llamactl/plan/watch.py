"""The auto-heal state machine behind ``llamactl watch`` (pure: the caller passes the time in).

Per instance it counts consecutive failed and passed probes. ``fall`` failures drain the instance
from the balancer and restart it; ``rise`` passes put it back. Restarts back off exponentially and
are limited to ``budget`` per ``window_s``; past that the machine stops restarting and says so
loudly, leaving the instance drained. An instance reporting ``loading`` within ``startup_grace_s``
of its start is never counted as failing (a model load takes minutes); ``stalled`` (the server's engine has
work and made no step progress for its stall_timeout_s) is a failure like any other, startup grace or not,
so a hung engine is drained and restarted within the same backoff and budget. A host that SSH cannot reach
is drained and retried only on the backoff schedule, never looped on. While a deploy or restart holds
the deploy lock (the caller reads it and passes the holder in), probes are still counted but nothing is
drained, restarted or put back: that deploy is restarting and draining instances on purpose.

``gpu_fault`` (the server's GPU reported a hardware fault) drains the instance at once and never restarts it:
it stays drained, whatever later probes say, until an operator clears it (``llamactl undrain``: the caller
reports that with ``cleared``). ``restore_fault`` puts back a fault recorded before this watch started.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal


class State(str, enum.Enum):
    HEALTHY = "healthy"
    FAILING = "failing"  # failed probes counted, below `fall`, still in the balancer
    RESTARTING = "draining+restarting"  # drained; a restart was asked for and not yet reported
    RECOVERING = "recovering"  # drained; restarted, waiting for `rise` passes
    HOST_DOWN = "host-down"  # drained; SSH could not reach the host
    GAVE_UP = "gave-up"  # drained; restart budget spent, a human must look
    GPU_FAULT = "gpu-fault"  # drained; the GPU reported a hardware fault: never restarted, an operator clears it


ProbeOutcome = Literal["ready", "loading", "stalled", "gpu_fault", "failed"]


@dataclass(frozen=True)
class Observation:
    """One probe of one instance. ``uptime_s`` comes from /health when the server answered."""

    outcome: ProbeOutcome
    detail: str = ""
    uptime_s: float | None = None


@dataclass(frozen=True)
class Policy:
    fall: int = 3
    rise: int = 2
    startup_grace_s: float = 600.0
    backoff_base_s: float = 10.0
    backoff_max_s: float = 600.0
    budget: int = 3
    window_s: float = 1800.0
    settle_s: float = 30.0  # after a restart we did, refused connections are the process starting up


@dataclass(frozen=True)
class Action:
    kind: Literal["drain", "undrain", "restart", "record_fault"]  # record_fault: persist it for undrain
    instance: str


@dataclass(frozen=True)
class Event:
    """Something worth a log line; ``fields`` are JSON-serialisable."""

    at: float
    event: str
    instance: str
    state: str
    level: Literal["info", "warning", "error"] = "info"
    fields: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "event": self.event, "instance": self.instance, "state": self.state,
                "level": self.level, **self.fields}


@dataclass
class _Track:
    state: State = State.HEALTHY
    failures: int = 0
    passes: int = 0
    started_at: float | None = None  # when we last restarted it (or it reported its start)
    restarts: list[float] = field(default_factory=list)  # times of restarts we asked for
    streak: int = 0  # restarts since it was last healthy: drives the backoff
    next_restart_at: float = 0.0


@dataclass(frozen=True)
class Step:
    actions: list[Action]
    events: list[Event]


class Watcher:
    """Feed it observations and restart outcomes; it answers with actions and events."""

    def __init__(self, instances: Iterable[str], policy: Policy) -> None:
        self.policy = policy
        self._tracks = {i: _Track() for i in instances}

    def state(self, instance: str) -> State:
        return self._tracks[instance].state

    @property
    def drained(self) -> frozenset[str]:
        return frozenset(i for i, t in self._tracks.items() if t.state not in (State.HEALTHY, State.FAILING))

    def observe(self, now: float, instance: str, obs: Observation, *, deploy_lock: str | None = None) -> Step:
        """``deploy_lock``: ``None`` when the deploy lock is free, else who holds it (``held by ...``)."""
        t = self._tracks[instance]
        actions: list[Action] = []
        events: list[Event] = []
        if obs.uptime_s is not None:
            started = now - obs.uptime_s
            t.started_at = started if t.started_at is None else max(t.started_at, started)

        def emit(name: str, level: Literal["info", "warning", "error"] = "info", **kw: Any) -> None:
            events.append(Event(now, name, instance, t.state.value, level, kw))

        def skip(action: str) -> Step:
            assert deploy_lock is not None
            emit("heal_skipped", "warning", action=action, held=deploy_lock,
                 detail=f"deploy in progress ({deploy_lock}), not healing")
            return Step(actions, events)

        if t.state is State.GPU_FAULT:
            return Step(actions, events)  # drained until an operator clears it, whatever the probe says
        if obs.outcome == "gpu_fault":
            if deploy_lock is not None:
                return skip("drain")
            previous = t.state
            t.state, t.failures, t.passes = State.GPU_FAULT, 0, 0
            if previous in (State.HEALTHY, State.FAILING):
                actions.append(Action("drain", instance))
            actions.append(Action("record_fault", instance))
            emit("gpu_fault", "error", detail=obs.detail, was=previous.value,
                 hint=f"drained and not restarted; after fixing the GPU: llamactl undrain INVENTORY {instance}")
            return Step(actions, events)

        if obs.outcome == "ready":
            t.failures = 0
            t.passes += 1
            if t.state is State.FAILING:
                t.state = State.HEALTHY
                emit("recovered_without_restart")
            elif t.state is not State.HEALTHY and t.state is not State.RESTARTING and t.passes >= self.policy.rise:
                if deploy_lock is not None:
                    return skip("undrain")  # passes keep counting: it goes back on the first tick after
                previous = t.state
                t.state, t.streak = State.HEALTHY, 0
                actions.append(Action("undrain", instance))
                emit("undrained", passes=t.passes, was=previous.value)
            return Step(actions, events)

        t.passes = 0
        if t.state is State.RESTARTING:
            return Step(actions, events)
        in_grace = t.started_at is not None and now - t.started_at < self.policy.startup_grace_s
        if obs.outcome == "loading" and in_grace:
            return Step(actions, events)  # still loading its model: not a failure
        restarted_at = t.restarts[-1] if t.restarts else None
        if restarted_at is not None and t.state is State.RECOVERING and now - restarted_at < self.policy.settle_s:
            return Step(actions, events)  # the new process is still importing, not yet listening
        t.failures += 1
        if t.state is State.HEALTHY:
            t.state = State.FAILING
            emit("probe_failed", "warning", failures=t.failures, outcome=obs.outcome, detail=obs.detail)
        elif t.state is State.FAILING:
            emit("probe_failed", "warning", failures=t.failures, outcome=obs.outcome, detail=obs.detail)
        if t.failures < self.policy.fall or t.state is State.GAVE_UP:
            return Step(actions, events)
        if t.state is State.FAILING:
            if deploy_lock is not None:
                return skip("drain+restart")  # failures keep counting: it heals on the first tick after
            t.state = State.RECOVERING  # drained, and about to restart below
            actions.append(Action("drain", instance))
            emit("drained", "warning", failures=t.failures, outcome=obs.outcome, detail=obs.detail)
        if now < t.next_restart_at:
            return Step(actions, events)
        recent = [r for r in t.restarts if now - r < self.policy.window_s]
        t.restarts = recent
        if len(recent) >= self.policy.budget:
            t.state = State.GAVE_UP
            emit("restart_budget_exhausted", "error", restarts=len(recent), window_s=self.policy.window_s,
                 detail=f"{len(recent)} restarts within {self.policy.window_s:g} s: no more restarts; "
                 "the instance stays drained until it passes its probes again")
            return Step(actions, events)
        if deploy_lock is not None:
            return skip("restart")
        t.state = State.RESTARTING
        actions.append(Action("restart", instance))
        emit("restart", "warning", attempt=t.streak + 1, outcome=obs.outcome, detail=obs.detail)
        return Step(actions, events)

    def restore_fault(self, now: float, instance: str) -> Step:
        """A fault recorded before this watch started (or by another watch): drained, not restarted."""
        t = self._tracks[instance]
        if t.state is State.GPU_FAULT:
            return Step([], [])
        t.state, t.failures, t.passes = State.GPU_FAULT, 0, 0
        return Step([], [Event(now, "gpu_fault_restored", instance, t.state.value, "warning",
                               {"detail": "a recorded GPU fault: stays drained until llamactl undrain"})])

    def cleared(self, now: float, instance: str) -> Step:
        """An operator cleared the fault (its record is gone): back in service as healthy; a GPU still
        faulted is drained again by its next probe."""
        t = self._tracks[instance]
        if t.state is not State.GPU_FAULT:
            return Step([], [])
        t.state, t.failures, t.passes, t.streak = State.HEALTHY, 0, 0, 0
        return Step([Action("undrain", instance)],
                    [Event(now, "gpu_fault_cleared", instance, t.state.value, "info", {})])

    @property
    def faulted(self) -> frozenset[str]:
        return frozenset(i for i, t in self._tracks.items() if t.state is State.GPU_FAULT)

    def restart_skipped(self, now: float, instance: str, deploy_lock: str) -> Step:
        """The restart ``observe`` asked for was not done: a deploy took the lock in between. The instance
        stays drained; no backoff, no budget spent; the next failed probe without the lock restarts it."""
        t = self._tracks[instance]
        if t.state is State.RESTARTING:
            t.state = State.RECOVERING
        return Step([], [Event(now, "heal_skipped", instance, t.state.value, "warning",
                               {"action": "restart", "held": deploy_lock,
                                "detail": f"deploy in progress ({deploy_lock}), not healing"})])

    def restart_done(self, now: float, instance: str, *, ok: bool, host_down: bool = False,
                     message: str = "") -> Step:
        """Report what the restart asked for by ``observe`` did."""
        t = self._tracks[instance]
        if t.state is State.GPU_FAULT:
            return Step([], [])  # faulted meanwhile: it stays drained and is not restarted again
        events: list[Event] = []
        t.failures = t.passes = 0
        t.streak += 1
        delay = min(self.policy.backoff_max_s, self.policy.backoff_base_s * 2 ** (t.streak - 1))
        t.next_restart_at = now + delay
        if host_down:
            # Does not count against the budget: nothing was restarted.
            t.state = State.HOST_DOWN
            events.append(Event(now, "host_unreachable", instance, t.state.value, "error",
                                {"detail": message, "retry_in_s": delay}))
            return Step([], events)
        t.restarts.append(now)
        t.started_at = now
        t.state = State.RECOVERING
        if ok:
            events.append(Event(now, "restarted", instance, t.state.value, "info", {"next_restart_in_s": delay}))
        else:
            events.append(Event(now, "restart_failed", instance, t.state.value, "error",
                                {"detail": message, "next_restart_in_s": delay}))
        return Step([], events)
