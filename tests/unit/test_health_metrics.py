"""The Prometheus text parser, histogram quantiles and rates (pure)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from llamactl.health import metrics as m

# Captured from the server's own registry (prometheus_client generate_latest) after 10 requests.
CAPTURED = (Path(__file__).parents[1] / "health" / "data" / "server_metrics.txt").read_text()


def test_parses_captured_server_exposition() -> None:
    scrape = m.parse(CAPTURED)
    assert scrape.value(m.RUNNING) == 2.0
    assert scrape.value(m.WAITING) == 5.0
    assert scrape.value(m.GPU_USED) == 21_000_000_000
    assert scrape.value(m.GPU_TOTAL) == 85_000_000_000
    assert scrape.types[m.LATENCY] == "histogram"
    assert scrape.value("llamactl_requests_total", {"endpoint": "/infer"}) == 10.0
    assert scrape.value("llamactl_requests_total", {"code": "429"}) == 1.0
    assert scrape.value("llamactl_no_such_metric") is None
    hist = scrape.histogram(m.LATENCY)
    assert hist is not None
    assert hist.count == 10 and hist.sum == pytest.approx(22.69)
    assert hist.buckets[0] == (0.05, 0.0) and hist.buckets[-1] == (math.inf, 10.0)


def test_quantiles_interpolate_inside_the_bucket_like_promql() -> None:
    hist = m.parse(CAPTURED).histogram(m.LATENCY)
    # rank 5 of 10 lies in (1.0, 2.5] holding ranks 5..7: 1.0 + 1.5 * (5 - 4) / 3
    assert m.quantile(hist, 0.5) == pytest.approx(1.5)
    # rank 9.5 lies in (5, 10] holding rank 10: 5 + 5 * 0.5 / 1
    assert m.quantile(hist, 0.95) == pytest.approx(7.5)


def test_quantile_in_the_inf_bucket_answers_the_highest_finite_bound() -> None:
    text = 'x_bucket{le="1"} 1\nx_bucket{le="2"} 2\nx_bucket{le="+Inf"} 10\nx_count 10\nx_sum 99\n'
    assert m.quantile(m.parse(text).histogram("x"), 0.95) == 2.0


def test_quantile_without_observations_is_none() -> None:
    empty = m.parse(CAPTURED).histogram("llamactl_time_to_first_token_seconds")
    assert empty is not None and empty.count == 0
    assert m.quantile(empty, 0.5) is None
    assert m.quantile(None, 0.5) is None


def test_histograms_add_across_label_sets() -> None:
    text = "\n".join(
        [
            'h_bucket{route="a",le="1"} 1',
            'h_bucket{route="a",le="+Inf"} 2',
            'h_bucket{route="b",le="1"} 3',
            'h_bucket{route="b",le="+Inf"} 4',
            'h_count{route="a"} 2',
            'h_count{route="b"} 4',
            'h_sum{route="a"} 5',
            'h_sum{route="b"} 1.5',
        ]
    )
    hist = m.parse(text).histogram("h")
    assert hist == m.Histogram(((1.0, 4.0), (math.inf, 6.0)), 6.0, 6.5)


def test_label_escapes_timestamps_and_special_values() -> None:
    text = (
        'e_total{reason="bad \\"quote\\"",path="C:\\\\x",msg="a\\nb"} 3 1700000000000\n'
        "g NaN\n"
        "h +Inf\n"
        "i -Inf\n"
        "j 1.5e3\n"
        "k{} 7\n"
    )
    scrape = m.parse(text)
    sample = scrape.matching("e_total")[0]
    assert dict(sample.labels) == {"reason": 'bad "quote"', "path": "C:\\x", "msg": "a\nb"}
    assert sample.value == 3
    g = scrape.value("g")
    assert g is not None and math.isnan(g)
    assert scrape.value("h") == math.inf and scrape.value("i") == -math.inf
    assert scrape.value("j") == 1500.0 and scrape.value("k") == 7


@pytest.mark.parametrize(
    "line",
    ["metric_without_value", 'm{le="1" 3', "m{le=1} 3", "m abc", "m 1 2 3"],
)
def test_bad_lines_name_their_line_number(line: str) -> None:
    with pytest.raises(m.MetricsParseError, match=r"^line 2: "):
        m.parse("# HELP ok fine\n" + line + "\n")


def test_histogram_difference_and_counter_reset() -> None:
    before = m.Histogram(((1.0, 2.0), (math.inf, 3.0)), 3.0, 4.0)
    after = m.Histogram(((1.0, 5.0), (math.inf, 8.0)), 8.0, 10.0)
    assert after.minus(before) == m.Histogram(((1.0, 3.0), (math.inf, 5.0)), 5.0, 6.0)
    assert before.minus(after) is None  # the server restarted between the scrapes


def test_rate() -> None:
    assert m.rate(10, 40, 15) == 2.0
    assert m.rate(40, 10, 15) is None
    assert m.rate(None, 10, 15) is None
    assert m.rate(1, 2, 0) is None
