"""bench/engine_bench.py (issue 10's benchmark): its pure parts, the load generator's ITL and deadline, and the
--tiny CPU mode end to end (so the one GPU call is not its first run)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from ._support import REPO

sys.path.insert(0, str(REPO / "bench"))

import engine_figures as ef
from gpu_load import CUT, gaps, pct, run_load


def test_roofline_fit_reproduces_the_baseline_note_figures() -> None:
    for batch, rate in ef.H100_ANCHORS.items():
        assert abs(ef.roofline_tok_s(batch, ef.H100_BW) / rate - 1) < 0.02
    assert 17e9 < ef.W_BYTES < 19e9 and 0.35e9 < ef.X_BYTES < 0.5e9
    # more rows, more tokens per step; an H200 is the same bytes at 4.8/3.35 the bandwidth
    assert ef.roofline_tok_s(64, ef.H100_BW) > ef.roofline_tok_s(32, ef.H100_BW)
    assert ef.roofline_tok_s(8, ef.H200_BW) == pytest.approx(ef.roofline_tok_s(8, ef.H100_BW) * 4.8 / 3.35)


def test_bandwidth_by_gpu_name_and_fraction() -> None:
    assert ef.bandwidth_for("NVIDIA H100 80GB HBM3")[0] == ef.H100_BW
    bw, note = ef.bandwidth_for("NVIDIA H200")
    assert bw == ef.H200_BW and "4.8/3.35" in note
    assert ef.bandwidth_for("NVIDIA H100 PCIe")[0] is None
    assert ef.bandwidth_for("")[0] is None
    assert ef.of_roofline(90.0, 1, ef.H100_BW) == round(90.0 / ef.roofline_tok_s(1, ef.H100_BW), 3)
    assert ef.of_roofline(90.0, 1, None) is None and ef.of_roofline(None, 1, ef.H100_BW) is None


def test_percentiles_and_gaps() -> None:
    assert pct([], 50) is None
    assert pct([3.0, 1.0, 2.0], 50) == 2.0
    assert pct([float(i) for i in range(1, 101)], 95) == 95.0
    assert ef.pct([5.0], 95) == 5.0
    assert gaps([1.0, 1.5, 1.75]) == [0.5, 0.25]
    assert gaps([1.0]) == []


def test_metrics_parsing_and_the_engine_window() -> None:
    text = ("# HELP llamactl_engine_steps_total Engine steps\n# TYPE llamactl_engine_steps_total counter\n"
            "llamactl_engine_steps_total 1000.0\nllamactl_generation_tokens_total 8000.0\n"
            'llamactl_request_errors_total{reason="oom"} 2.0\nllamactl_kv_pool_usage_ratio 0.25\nbroken line\n')
    first = ef.parse_metrics(text)
    assert first == {"llamactl_engine_steps_total": 1000.0, "llamactl_generation_tokens_total": 8000.0,
                     "llamactl_kv_pool_usage_ratio": 0.25}
    last = {"llamactl_engine_steps_total": 1500.0, "llamactl_generation_tokens_total": 24000.0}
    w = ef.engine_window(first, last, {"llamactl_kv_pool_usage_ratio": 0.5}, 10.0)
    assert w == {"kv_pool_usage_ratio_peak": 0.5, "engine_steps_per_s": 50.0, "tokens_per_step": 32.0}
    assert ef.engine_window({}, {}, {}, 0.0) == {}
    # a request's time before its first token: the level's mean of each histogram (its _sum over its _count)
    first = {"llamactl_request_queue_seconds_count": 10.0, "llamactl_request_queue_seconds_sum": 4.0,
             "llamactl_image_decode_seconds_count": 10.0, "llamactl_image_decode_seconds_sum": 0.2}
    last = {"llamactl_request_queue_seconds_count": 14.0, "llamactl_request_queue_seconds_sum": 6.0,
            "llamactl_image_decode_seconds_count": 10.0, "llamactl_image_decode_seconds_sum": 0.2}
    assert ef.engine_window(first, last, {}, 1.0) == {"request_queue_mean_s": 0.5}  # no new images: no mean


def _design(levels: dict[int, dict[str, Any]], engine: str = "continuous") -> dict[str, Any]:
    return {"ready_s": 1.0, "engine_reported": engine,
            "levels": [{"concurrency": c, "failed": 0, "cut": 0, **v} for c, v in levels.items()]}


def test_acceptance_rows() -> None:
    designs = {
        "continuous": _design({1: {"tok_per_s": 120.0, "ttft_s_p50": 0.15},
                               32: {"tok_per_s": 1600.0, "ttft_s_p95": 1.2, "burst_ttft_s_p95": 1.6,
                                    "after_burst_ttft_s_p95": 0.8},
                               64: {"tok_per_s": 1500.0, "server_alive_after": True}}),
        "hf": _design({32: {"tok_per_s": 500.0}}, engine="hf"),
    }
    rows = {r["criterion"]: r for r in ef.acceptance(designs, "NVIDIA H100 80GB HBM3")}
    assert rows["32 clients: output tok/s"]["pass"] is True
    assert rows["32 clients: x the hf engine"]["measured"] == 3.2
    assert rows["32 clients: TTFT p95 s"]["pass"] is True
    assert rows["32 clients, the opening burst: TTFT p95 s"]["pass"] is False  # 1.6 > 1.5
    assert rows["32 clients, after the burst: TTFT p95 s"]["measured"] == 0.8
    assert rows["1 client: output tok/s"]["pass"] is True
    assert rows["1 client: TTFT p50 s"]["pass"] is True
    assert rows["64 clients: failed requests (no OOM)"]["pass"] is True
    assert rows["64 clients: tok/s vs 32 clients"]["pass"] is False  # 1500 < 1600
    assert all(r["note"] == "" for r in rows.values())
    # a server that did not run the continuous engine, on an H200, with nothing at 64: said, not hidden
    designs["continuous"]["engine_reported"] = None
    del designs["continuous"]["levels"][2]
    rows = {r["criterion"]: r for r in ef.acceptance(designs, "NVIDIA H200")}
    assert rows["64 clients: failed requests (no OOM)"]["pass"] is None
    note = rows["1 client: output tok/s"]["note"]
    assert "NVIDIA H200" in note and "not 'continuous'" in note


def test_markdown_of_a_partial_run() -> None:
    info: dict[str, Any] = {"mode": "11b-shape-random-bf16", "env": {"gpu_name": "NVIDIA H100 80GB HBM3"}, "status": "partial: x",
            "baseline": {"runs": [{"batch": 1, "new_tokens": 128, "wall_s": 5.0, "tok_per_s": 25.6}],
                         "error": "exit 1"},
            "designs": {"continuous": {"title": "t", "levels": [
                {"concurrency": 1, "ok": 6, "failed": 0, "cut": 0, "tok_per_s": 100.0, "req_per_s": 0.8,
                 "itl_s_p50": 0.009, "itl_s_p95": 0.012},
                {"concurrency": 8, "skipped": "needs ~40s"},
                {"concurrency": 32, "ok": 64, "failed": 0, "tok_per_s": 1600.0, "req_per_s": 12.5,
                 "engine_metrics": {"engine_steps_per_s": 50.0, "tokens_per_step": 31.5,
                                    "request_queue_mean_s": 0.25, "time_to_first_token_mean_s": 0.9}}],
                "error": "boom"}}}
    info["acceptance"] = ef.acceptance(info["designs"], "NVIDIA H100 80GB HBM3")
    md = ef.markdown(info)
    assert "partial: x" in md and "needs ~40s" in md and "boom" in md and "9.0 / 12.0" in md
    assert "| 32 | 50.0 | 31.50 |" in md and "| - / - / 0.250 / 0.900 |" in md
    text = ef.summary(info)
    assert "continuous        8  needs ~40s" in text and "acceptance: 32 clients: output tok/s: 1600.00" in text


def test_designs_split_the_levels_above_the_hf_batch() -> None:
    import engine_bench

    a = argparse.Namespace(levels=[1, 8, 32, 64], hf_max_batch=32, seed_levels=[1, 8], rounds=2, min_requests=6,
                           seed_min_requests=4, hf_max_wait_ms=200, designs=["continuous", "hf", "seed", "hf-big"],
                           sm_levels=[32], vp_levels=[32, 64], prev=None)
    got = {d.name: (d.engine, d.max_batch, d.levels, d.max_wait_ms) for d in engine_bench.designs_from(a)}
    assert got == {"continuous": ("continuous", 64, [1, 8, 32, 64], None), "hf": ("hf", 32, [1, 8, 32], 200),
                   "seed": ("hf", 1, [1, 8], 200), "hf-b64": ("hf", 64, [64], 200)}
    a.designs = ["continuous-sm"]
    [sm] = engine_bench.designs_from(a)
    assert (sm.engine, sm.levels, sm.env) == ("continuous", [32], {"LLAMACTL_VISION_SMS": "-1"})
    a.designs = ["continuous-vp"]
    [vp] = engine_bench.designs_from(a)
    assert (vp.engine, vp.levels, vp.env) == ("continuous", [32, 64], {"LLAMACTL_VISION_PRIORITY": "high"})
    a.designs = ["continuous-c2vp"]
    [c2vp] = engine_bench.designs_from(a)
    assert c2vp.env == {"LLAMACTL_PREFILL_CHUNK_IMAGES": "2", "LLAMACTL_VISION_PRIORITY": "high"}
    a.designs = ["nope"]
    with pytest.raises(SystemExit, match="unknown design 'nope'"):
        engine_bench.designs_from(a)
    a.designs = ["continuous-prev"]  # only with --prev
    with pytest.raises(SystemExit, match="unknown design 'continuous-prev'"):
        engine_bench.designs_from(a)


def test_the_prev_design_serves_the_other_package(tmp_path: Path) -> None:
    """--prev: the continuous-prev design's server (`python -m llamactl` with its env and cwd) imports the
    llamactl package in that folder, not this checkout's."""
    import engine_bench

    (tmp_path / "llamactl").mkdir()
    (tmp_path / "llamactl" / "__init__.py").write_text("")
    (tmp_path / "llamactl" / "__main__.py").write_text("import llamactl; print('prev package at', llamactl.__file__)")
    a = argparse.Namespace(levels=[1, 8, 32, 64], hf_max_batch=32, seed_levels=[1, 8], rounds=2, min_requests=6,
                           seed_min_requests=4, hf_max_wait_ms=200, designs=["continuous-prev"], sm_levels=[32],
                           vp_levels=[32, 64], prev=tmp_path)
    [prev] = engine_bench.designs_from(a)
    assert (prev.engine, prev.levels, prev.cwd) == ("continuous", [32, 64], tmp_path.resolve())
    env = {**os.environ, "PYTHONPATH": str(REPO), **prev.env}  # as server_env: this checkout, then the design's
    out = subprocess.run([sys.executable, "-m", "llamactl"], env=env, cwd=prev.cwd, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"prev package at {tmp_path.resolve() / 'llamactl' / '__init__.py'}"


def test_cpu_figure_ratios_per_repeat() -> None:
    import engine_cpu_bench as cpu

    runs = [{"repeat": 1, "design": "continuous", "tok_per_s": 3000.0, "failed": 0, "server_cores": 0.6},
            {"repeat": 1, "design": "seed", "tok_per_s": 500.0, "failed": 0, "server_cores": 0.8},
            {"repeat": 2, "design": "continuous", "tok_per_s": 2000.0, "failed": 1, "server_cores": 0.6},
            {"repeat": 2, "design": "seed", "tok_per_s": 400.0, "failed": 0, "server_cores": 0.8}]
    assert cpu.ratios(runs, "seed", cpu._tok) == [6.0]  # a burst with a failed request counts for nothing
    assert cpu.ratios(runs, "seed", cpu._per_cpu) == [8.0]
    assert cpu.ratios(runs, "hf", cpu._tok) == []


# -- the load generator against a fake streaming server (starlette + uvicorn on a real socket) -------------

@pytest.fixture
def slow_sse() -> Iterator[str]:
    """A chat-completions stand-in: 8 content chunks 50 ms apart, then usage and [DONE]."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def chat(request: Request) -> StreamingResponse:
        body = await request.json()
        n = int(body["max_tokens"])

        async def events() -> AsyncIterator[str]:
            yield 'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n\n'
            for _ in range(n):
                await asyncio.sleep(0.05)
                yield 'data: {"choices": [{"delta": {"content": "w1 "}}]}\n\n'
            yield f'data: {{"choices": [], "usage": {{"completion_tokens": {n}}}}}\n\n'
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])]),
                                           host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_load_measures_inter_token_latency(slow_sse: str) -> None:
    r = run_load(slow_sse, concurrency=2, requests=4, max_tokens=8, images=["data:image/jpeg;base64,AA=="])
    assert (r["ok"], r["failed"], r["cut"]) == (4, 0, 0)
    assert r["completion_tokens"] == 32 and r["chunks_per_request_mean"] == 8
    assert 0.04 < r["itl_s_p50"] < 0.2 and r["itl_s_p95"] >= r["itl_s_p50"]
    assert 0.04 < r["tpot_s_mean"] < 0.2


def test_load_deadline_cuts_running_requests(slow_sse: str) -> None:
    t0 = time.monotonic()
    r = run_load(slow_sse, concurrency=2, requests=10, max_tokens=8, images=["x"], deadline=time.time() + 0.2,
                 grace_s=0.05)
    assert time.monotonic() - t0 < 1.5  # 10 requests of 0.4 s would take 2 s
    assert r["cut"] == 2 and r["failed"] == 0 and r["ok"] == 0
    assert not r["errors"]  # cut requests are the bench's doing, not the server's errors
    assert CUT


# -- end to end on the CPU ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_engine_bench_tiny_mode(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench/engine_bench.py"), "--tiny", "--model-dir", str(tiny_checkpoint),
         "--out", str(out), "--work", str(tmp_path / "work"), "--designs", "continuous,seed", "--levels", "1,2",
         "--seed-levels", "2", "--baseline-batches", "1,2", "--min-requests", "2", "--seed-min-requests", "2",
         "--budget-s", "150", "--rounds", "2"],
        capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "engine_bench.json").read_text())
    assert data["status"] == "complete", data["status"]
    assert [r["batch"] for r in data["baseline"]["runs"]] == [1, 2]
    assert all(r["new_tokens"] == 8 for r in data["baseline"]["runs"])
    assert list(data["designs"]) == ["continuous", "seed"]
    for name, conc in (("continuous", [1, 2]), ("seed", [2])):
        d = data["designs"][name]
        assert d["server_exit_code"] == 0 and "error" not in d, d.get("error")
        assert [lv["concurrency"] for lv in d["levels"]] == conc
        for lv in d["levels"]:
            assert lv["failed"] == 0 and lv["ok"] >= 2 and lv["completion_tokens"] == 8 * lv["ok"]
            assert lv["tok_per_s"] > 0 and lv["ttft_s_p50"] is not None and lv["itl_s_p50"] is not None
    assert data["designs"]["seed"]["env_summary"].startswith("LLAMACTL_ENGINE=hf LLAMACTL_MAX_BATCH_SIZE=1")
    md = (out / "engine_bench.md").read_text()
    assert "## continuous" in md and "## seed" in md and "Bare HF generate" in md
    assert (out / "engine_bench.log").exists() and (out / "server_logs.txt").exists()


def test_steady_window_leaves_out_the_opening_burst_and_the_drain() -> None:
    """2 clients, 4 requests each of 10 one-token chunks: the window runs from the end of the slowest first
    request to the last send; its tokens per second and TTFTs come from inside it only."""
    from gpu_load import Outcome, steady

    def req(start: float, ttft: float, first: bool) -> Outcome:
        at = [start + ttft + 0.1 * k for k in range(10)]
        return Outcome(True, at[-1] - start, ttft, 10, "direct", "", [], 10, start, at, first)

    outs = [req(0.0, 3.0, True), req(0.0, 1.0, True)]  # the burst: slow first tokens
    t = {0: outs[0].started_at + outs[0].e2e_s, 1: outs[1].started_at + outs[1].e2e_s}
    for _ in range(3):  # then each client sends again as soon as its previous answer ends
        for c in (0, 1):
            o = req(t[c], 0.2, False)
            outs.append(o)
            t[c] = o.started_at + o.e2e_s
    r = steady(outs)
    start, end = 3.9, max(o.started_at for o in outs)
    assert r["steady_window_s"] == round(end - start, 2)
    inside = sum(1 for o in outs for a in o.arrivals_at if start <= a <= end)
    assert r["steady_tok_per_s"] == round(inside / (end - start), 1)
    assert r["steady_ttft_s_p95"] == 0.2 and r["steady_requests"] == sum(
        1 for o in outs if start <= o.started_at <= end)
    assert steady(outs[:3]) == {"steady_note": "too short: rounds >= 3 give a steady window"}


def test_ttft_split_names_the_burst_and_the_slowest_first_tokens() -> None:
    """The opening burst's TTFTs apart from the rest; the slowest first tokens with their send time."""
    from gpu_load import Outcome, ttft_split

    def req(start: float, ttft: float, first: bool, ok: bool = True) -> Outcome:
        return Outcome(ok, ttft + 1.0, ttft, 10, "direct", "", [], 10, 100.0 + start, [], first)

    outs = [req(0.0, 0.5 + 0.1 * i, True) for i in range(4)] + [req(2.0 + i, 0.2, False) for i in range(6)]
    outs.append(req(9.0, 9.0, False, ok=False))  # a failed request counts nowhere
    r = ttft_split(outs)
    assert r["burst_ttft_s_max"] == 0.8 and r["burst_ttft_s_p50"] == 0.6  # nearest rank
    assert r["after_burst_ttft_s_p50"] == r["after_burst_ttft_s_p95"] == 0.2
    assert r["slowest_ttft"][0] == [0.0, 0.8, True] and len(r["slowest_ttft"]) == 8
    assert r["slowest_ttft"][4] == [2.0, 0.2, False]
    assert len(r["ttft_timeline"]) == 10 and r["ttft_timeline"][3] == [0.0, 0.8, 1.8]
    assert [t[0] for t in r["ttft_timeline"][4:]] == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert ttft_split([]) == {}


def test_burst_probe_summary_parts_the_closed_loops_later_rounds_from_the_burst() -> None:
    """engine_burst_probe.summarize: the p95 request by client TTFT, the mean request, and with --rounds the mean
    request of the later rounds alone (a plain burst has none)."""
    from engine_burst_probe import STAGES, summarize

    def row(ttft: float, queue: float, first: bool) -> dict[str, Any]:
        return {**dict.fromkeys(STAGES, 0.0), "queue": queue, "ttft": ttft, "first_round": first}

    burst = [row(1.0 + i / 10, 0.5, True) for i in range(4)]
    later = [row(0.4, 0.1, False), row(0.6, 0.3, False)]
    rows = sorted(burst + later, key=lambda r: r["ttft"])
    got = summarize([{"requests": [*rows, {"image": 9, "ttft": None, "missing": True}]}])
    assert got["ttft_p95"] == [1.3] and got["p95_request"]["queue"] == 0.5
    assert got["mean_request"]["queue"] == round((4 * 0.5 + 0.4) / 6, 4)
    assert got["mean_request_after_burst"]["queue"] == 0.2 and got["mean_request_after_burst"]["ttft"] == 0.5
    assert "mean_request_after_burst" not in summarize([{"requests": sorted(burst, key=lambda r: r["ttft"])}])


def test_burst_probe_lineup_dates_a_chunks_tower_by_the_device_and_its_stages_add_up() -> None:
    """engine_burst_probe.lineup: a chunk queued on the tower's stream behind another waits there (tower_wait)
    before its own device time, and the loop sees it done after (join_wait); with the device's begin and end in
    the trace each stage is measured, and the stages add up to the client's TTFT."""
    from engine_burst_probe import STAGES, lineup
    from gpu_load import Outcome

    sent = 1000.0
    out = Outcome(ok=True, e2e_s=2.0, ttft_s=1.0, completion_tokens=8, upstream="-", started_at=sent, image=7)
    records = [
        {"kind": "decode", "image": 7, "start": sent + 0.02, "end": sent + 0.03},
        {"kind": "prepare", "image": 7, "start": sent + 0.04, "end": sent + 0.06},
        {"kind": "add", "image": 7, "at": sent + 0.06},
        # launched at +0.10 behind another chunk: began on the device at +0.30, ended at +0.58
        {"kind": "chunk", "images": [7], "taken": sent + 0.10, "started": sent + 0.10, "tower_ms": 280.0,
         "tower_begin": sent + 0.30, "tower_end": sent + 0.58, "joined": sent + 0.70, "first_tokens": sent + 0.95,
         "running_after": 1},
    ]
    [row] = lineup([out], records)["requests"]
    assert (row["tower_wait"], row["tower"], row["join_wait"]) == (0.2, 0.28, 0.12)
    assert round(sum(row[k] for k in STAGES), 4) == row["ttft"] == 1.0
    # an older trace (no device dates): the tower counted from its launch, the wait folded into join_wait
    old = [r if r["kind"] != "chunk" else {k: v for k, v in r.items() if k not in ("tower_begin", "tower_end")}
           for r in records]
    [row] = lineup([out], old)["requests"]
    assert (row["tower_wait"], row["tower"], row["join_wait"]) == (0.0, 0.28, 0.32)


def test_gpu_sampler_means_sm_clock_and_power_over_the_marked_window(tmp_path: Path) -> None:
    from gpu_stack import GpuSampler

    csv = tmp_path / "gpu_samples.csv"
    sampler = GpuSampler(csv)
    csv.write_text("2026/11/29 10:00:00.000, 0, 10, 1000, 1980, 300.0\n")
    sampler.mark()  # the rows before the mark are another window's
    csv.write_text(csv.read_text() + "2026/11/29 10:00:00.500, 0, 90, 5000, 1755, 690.5\n"
                   "2026/11/29 10:00:01.000, 0, 100, 6000, 1545, [N/A]\n"
                   "2026/11/29 10:00:01.500, 0, 50\n")  # a cut line is not a sample
    assert sampler.mean_util_since_mark() == {"0": {
        "util_pct": 95.0, "mem_used_mib_max": 6000.0, "samples": 2, "sm_clock_mhz_mean": 1650.0,
        "power_w_mean": 690.5}}


def test_a_budget_too_small_for_the_designs_is_refused_before_anything_starts() -> None:
    import engine_bench as eb

    def args(designs: list[str], levels: list[int]) -> argparse.Namespace:
        return argparse.Namespace(levels=levels, hf_max_batch=32, rounds=4, min_requests=6, sm_levels=[32],
                                  vp_levels=levels, seed_levels=[1, 8], seed_min_requests=4, hf_max_wait_ms=200, prev=None,
                                  designs=designs)

    three = eb.designs_from(args(["continuous", "continuous-vl", "continuous-vp"], [32, 64]))
    # Session 16's first call: 240 s for three designs and the checkpoint's build
    problem = eb.budget_problem(240, 50, three)
    assert problem is not None and "continuous-vl ~52 s" in problem and "give --budget-s 315 or more" in problem
    assert eb.budget_problem(315, 50, three) is None  # what it asks for is enough
    assert eb.budget_problem(500, 0, three) is None  # the second call, the checkpoint built
    # the default run: the hf designs start sooner, so their smaller shares are enough
    default = eb.designs_from(args(["continuous", "hf", "seed", "hf-big"], [1, 8, 32, 64]))
    assert [d.name for d in default] == ["continuous", "hf", "seed", "hf-b64"]
    assert eb.budget_problem(540, 110, default) is None


def test_the_bench_refuses_a_short_budget_with_a_usage_error(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "bench/engine_bench.py"), "--budget-s", "240", "--designs",
                          "continuous,continuous-vl,continuous-vp", "--levels", "32,64", "--baseline-batches", "",
                          "--model-dir", str(tmp_path / "none"), "--out", str(tmp_path / "out")],
                         check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "--budget-s 240 is the whole run's" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()


def test_the_markdown_names_memory_held_back_by_a_ballast() -> None:
    info: dict[str, Any] = {"mode": "11b-shape-random-bf16", "env": {"gpu_name": "NVIDIA H200"}, "designs": {},
                            "gpu_ballast": {"held_gib": 60.1, "free_gib": 79.18, "total_gib": 139.8}}
    md = ef.markdown(info)
    assert "60.1 GiB of 139.8, leaving 79.18 GiB free" in md
    assert "Memory held back" not in ef.markdown({**info, "gpu_ballast": None})


def test_a_ballast_that_cannot_hold_is_an_error_not_a_silent_full_card() -> None:
    import engine_bench

    # no CUDA device here: the ballast process exits before its line, and the bench must not go on as if held
    with pytest.raises(RuntimeError, match="ballast exited"):
        engine_bench.start_ballast(79.18)
