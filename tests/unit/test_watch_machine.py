"""The watch state machine, driven with a fake clock (plain numbers)."""

from __future__ import annotations

import itertools

from llamactl.plan.watch import Action, Observation, Policy, State, Watcher

OK = Observation("ready", uptime_s=None)
FAIL = Observation("failed", "connection refused")
I = "h1/0"


def make(**kw: float) -> Watcher:
    policy = Policy(**{"fall": 3, "rise": 2, "startup_grace_s": 600, "backoff_base_s": 10, "backoff_max_s": 80,
                       "budget": 3, "window_s": 1800, "settle_s": 30, **kw})  # type: ignore[arg-type]
    return Watcher([I, "h2/0"], policy)


def actions(w: Watcher, now: float, obs: Observation) -> list[str]:
    return [a.kind for a in w.observe(now, I, obs).actions]


def test_fall_failures_drain_and_restart_then_rise_undrains() -> None:
    w = make()
    assert actions(w, 0, OK) == []
    assert actions(w, 5, FAIL) == [] and w.state(I) is State.FAILING
    assert actions(w, 10, FAIL) == []
    assert I not in w.drained
    assert actions(w, 15, FAIL) == ["drain", "restart"]
    assert w.state(I) is State.RESTARTING and I in w.drained
    w.restart_done(16, I, ok=True)
    assert w.state(I) is State.RECOVERING
    assert actions(w, 20, OK) == []
    assert actions(w, 25, OK) == ["undrain"]
    assert w.state(I) is State.HEALTHY and w.drained == frozenset()


def test_a_single_blip_recovers_without_restart() -> None:
    w = make()
    actions(w, 0, FAIL)
    step = w.observe(5, I, OK)
    assert step.actions == [] and [e.event for e in step.events] == ["recovered_without_restart"]
    assert w.state(I) is State.HEALTHY
    # the counter was reset: two more failures are not enough
    assert actions(w, 10, FAIL) == [] and actions(w, 15, FAIL) == []


def test_loading_within_grace_never_restarts() -> None:
    w = make()
    loading = Observation("loading", uptime_s=100)
    for t in range(0, 400, 5):
        assert actions(w, 200 + t, Observation("loading", uptime_s=100 + t)) == []
    assert w.state(I) is State.HEALTHY
    # past the grace period (uptime > 600 s) loading counts as failing
    assert actions(w, 1000, Observation("loading", uptime_s=900)) == []
    assert actions(w, 1005, Observation("loading", uptime_s=905)) == []
    assert actions(w, 1010, Observation("loading", uptime_s=910)) == ["drain", "restart"]
    del loading


def test_loading_after_our_restart_is_in_grace_even_without_uptime() -> None:
    w = make()
    for t in (0, 5, 10):
        actions(w, t, FAIL)
    w.restart_done(11, I, ok=True)
    for t in range(15, 500, 5):
        assert actions(w, t, Observation("loading")) == []
    assert w.state(I) is State.RECOVERING


def test_refused_while_settling_after_restart_is_not_counted() -> None:
    w = make()
    for t in (0, 5, 10):
        actions(w, t, FAIL)
    w.restart_done(10, I, ok=True)
    for t in (15, 20, 25, 35):  # within the 30 s settle time after the restart at 10
        assert actions(w, t, FAIL) == []
    assert actions(w, 45, FAIL) == []
    assert actions(w, 50, FAIL) == []
    assert actions(w, 55, FAIL) == ["restart"]  # counted: 45, 50, 55 (the 10 s backoff has passed)


def test_backoff_doubles_and_budget_stops_restarts_loudly() -> None:
    w = make(settle_s=0)
    restarts: list[float] = []
    now = 0.0
    for _ in range(200):
        now += 5
        step = w.observe(now, I, FAIL)
        if any(a.kind == "restart" for a in step.actions):
            restarts.append(now)
            w.restart_done(now, I, ok=True)
        if w.state(I) is State.GAVE_UP:
            break
    assert len(restarts) == 3
    gaps = [b - a for a, b in itertools.pairwise(restarts)]
    assert gaps[0] >= 10 and gaps[1] >= 20 and gaps[1] > gaps[0]
    assert w.state(I) is State.GAVE_UP and I in w.drained
    # no more restarts ever, while it keeps failing
    for _ in range(50):
        now += 5
        assert actions(w, now, FAIL) == []
    # it comes back on its own: put back after `rise` passes
    assert actions(w, now + 5, OK) == []
    assert actions(w, now + 10, OK) == ["undrain"]


def test_budget_event_is_an_error() -> None:
    w = make(settle_s=0, budget=1)
    for t in (0, 5, 10):
        actions(w, t, FAIL)
    w.restart_done(10, I, ok=True)
    events = []
    for t in range(15, 200, 5):
        events += w.observe(t, I, FAIL).events
    exhausted = [e for e in events if e.event == "restart_budget_exhausted"]
    assert len(exhausted) == 1 and exhausted[0].level == "error"
    assert exhausted[0].as_dict()["restarts"] == 1


def test_budget_window_slides() -> None:
    w = make(settle_s=0, budget=2, window_s=100, backoff_base_s=1, backoff_max_s=1)
    kinds: list[str] = []
    now = 0.0
    for _ in range(100):
        now += 5
        kinds += actions(w, now, FAIL)
        if w.state(I) is State.RESTARTING:
            w.restart_done(now, I, ok=True)
    assert kinds.count("restart") == 2  # gave up after two within the window
    assert w.state(I) is State.GAVE_UP


def test_unreachable_host_is_drained_and_not_looped_on() -> None:
    w = make()
    for t in (0, 5, 10):
        actions(w, t, FAIL)
    step = w.restart_done(10, I, ok=False, host_down=True, message="h1: connection refused")
    assert [e.event for e in step.events] == ["host_unreachable"]
    assert w.state(I) is State.HOST_DOWN and I in w.drained
    # probing every 5 s: next attempt only after the backoff (10 s), then 20 s, 40 s ...
    attempts: list[float] = []
    for t in range(15, 200, 5):
        if "restart" in actions(w, t, FAIL):
            attempts.append(t)
            w.restart_done(t, I, ok=False, host_down=True)
    assert len(attempts) >= 2
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert all(g >= 20 for g in gaps) and gaps == sorted(gaps)
    assert w.state(I) is not State.GAVE_UP  # unreachable attempts do not spend the budget


def test_failed_restart_counts_against_budget() -> None:
    w = make(settle_s=0, budget=1)
    for t in (0, 5, 10):
        actions(w, t, FAIL)
    step = w.restart_done(10, I, ok=False, message="exit 1")
    assert step.events[0].event == "restart_failed" and step.events[0].level == "error"


def test_instances_are_independent() -> None:
    w = make()
    for t in (0, 5, 10):
        w.observe(t, I, FAIL)
        w.observe(t, "h2/0", OK)
    assert w.drained == frozenset({I})
    assert w.state("h2/0") is State.HEALTHY


def test_restart_action_names_the_instance() -> None:
    w = make()
    for t in (0, 5):
        w.observe(t, I, FAIL)
    assert w.observe(10, I, FAIL).actions == [Action("drain", I), Action("restart", I)]


HELD = "held by alice@laptop since 2026-01-01T10:00 (llamactl restart inv.yaml --rolling)"


def test_no_drain_or_restart_while_the_deploy_lock_is_held() -> None:
    w = make()
    for t in (0, 5):
        assert actions(w, t, FAIL) == []
    step = w.observe(10, I, FAIL, deploy_lock=HELD)  # the `fall`th failure: would drain and restart
    assert step.actions == [] and w.state(I) is State.FAILING and w.drained == frozenset()
    skipped = [e for e in step.events if e.event == "heal_skipped"]
    assert len(skipped) == 1 and skipped[0].level == "warning"
    assert skipped[0].fields["detail"] == f"deploy in progress ({HELD}), not healing"
    assert skipped[0].fields["action"] == "drain+restart" and skipped[0].fields["held"] == HELD
    assert [a.kind for a in w.observe(15, I, FAIL, deploy_lock=HELD).actions] == []  # every held tick
    # the lock is gone: the next failed probe heals at once (the failures kept counting)
    assert actions(w, 20, FAIL) == ["drain", "restart"]


def test_a_drained_instance_is_not_restarted_or_undrained_while_held() -> None:
    w = make()
    for t in (0, 5, 10):
        actions(w, t, FAIL)
    w.restart_done(11, I, ok=True)  # restarted once; backoff 10 s
    assert w.state(I) is State.RECOVERING
    for t in (50, 55, 60):
        step = w.observe(t, I, FAIL, deploy_lock=HELD)
        assert step.actions == []
    assert [e.fields["action"] for e in step.events if e.event == "heal_skipped"] == ["restart"]
    assert w.state(I) is State.RECOVERING and I in w.drained  # stays drained: no balancer change
    # it recovers while the deploy runs: passes count, but it is put back only once the lock is free
    for t in (65, 70, 75):
        assert [a.kind for a in w.observe(t, I, OK, deploy_lock=HELD).actions] == []
    assert w.state(I) is State.RECOVERING
    assert actions(w, 80, OK) == ["undrain"] and w.state(I) is State.HEALTHY


def test_a_restart_skipped_after_the_decision_spends_no_budget() -> None:
    w = make(budget=1)
    for t in (0, 5, 10):
        actions(w, t, FAIL)
    assert w.state(I) is State.RESTARTING
    step = w.restart_skipped(10, I, HELD)  # the loop found the lock taken just before restarting
    assert [e.event for e in step.events] == ["heal_skipped"] and step.events[0].fields["action"] == "restart"
    assert w.state(I) is State.RECOVERING and I in w.drained
    assert actions(w, 15, FAIL) == ["restart"]  # no backoff, and the budget of 1 is still there


STALL = "engine stalled: no step completed for 75.0 s with work waiting (stall_timeout_s 60)"


def test_a_stalled_engine_is_drained_and_restarted_even_within_startup_grace() -> None:
    w = make()
    # uptime 120 s: well within the 600 s startup grace, which excuses only `loading`
    events = []
    for t in (0, 5, 10):
        step = w.observe(t, I, Observation("stalled", STALL, uptime_s=120 + t))
        events += step.events
    assert [a.kind for a in step.actions] == ["drain", "restart"]
    assert [e.event for e in events] == ["probe_failed", "probe_failed", "probe_failed", "drained", "restart"]
    assert all(e.fields["outcome"] == "stalled" and e.fields["detail"] == STALL for e in events)
    w.restart_done(11, I, ok=True)
    assert actions(w, 20, OK) == [] and actions(w, 25, OK) == ["undrain"]
    assert w.state(I) is State.HEALTHY


def test_a_stall_that_clears_before_fall_needs_no_restart() -> None:
    w = make()
    stalled = Observation("stalled", STALL, uptime_s=5000)
    assert actions(w, 0, stalled) == [] and actions(w, 5, stalled) == []
    step = w.observe(10, I, OK)  # a long step finished: progress again
    assert step.actions == [] and [e.event for e in step.events] == ["recovered_without_restart"]


def test_a_stalled_engine_gets_the_same_backoff_and_budget_as_a_failed_one() -> None:
    def restart_times(obs: Observation) -> tuple[list[float], State]:
        w = make(settle_s=0)
        restarts: list[float] = []
        now = 0.0
        for _ in range(200):
            now += 5
            if any(a.kind == "restart" for a in w.observe(now, I, obs).actions):
                restarts.append(now)
                w.restart_done(now, I, ok=True)
        return restarts, w.state(I)

    stalled = restart_times(Observation("stalled", STALL, uptime_s=30))
    assert stalled == restart_times(FAIL)
    assert len(stalled[0]) == 3 and stalled[1] is State.GAVE_UP
