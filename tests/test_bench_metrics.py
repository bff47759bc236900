"""The arithmetic behind the benchmark table: tokens/s, speedup per repetition, tau, identity bookkeeping."""

from __future__ import annotations

import pytest

from hf_spec.bench.identity import check_identity, first_difference
from hf_spec.bench.measure import Measurement, interleaved_order
from hf_spec.bench.methods import Method
from hf_spec.bench.metrics import OVERALL, mean_accepted_tokens, speedup, summarize, tokens_per_second


def record(method, group, repeat, seconds, tokens, forwards, item="a"):
    return Measurement(method, f"{group}/{item}", group, repeat, seconds, tokens, forwards, tokens - forwards)


def test_tokens_per_second_pools_tokens_and_time():
    records = [record("m", "g", 0, 1.0, 10, 10), record("m", "g", 0, 3.0, 30, 30, item="b")]
    assert tokens_per_second(records) == pytest.approx(40 / 4.0)
    assert tokens_per_second([]) == 0.0


def test_mean_accepted_tokens_is_tokens_per_decoding_step():
    records = [record("m", "g", 0, 1.0, 12, 4), record("m", "g", 1, 1.0, 8, 4)]
    assert mean_accepted_tokens(records) == pytest.approx(20 / 8)
    assert mean_accepted_tokens([record("plain", "g", 0, 1.0, 7, 7)]) == 1.0


def test_speedup_is_the_median_of_per_repetition_ratios():
    baseline = [record("plain", "g", r, 2.0, 20, 20) for r in range(3)]  # 10 tokens/s each repetition
    method = [record("m", "g", 0, 1.0, 20, 5), record("m", "g", 1, 4.0, 20, 5), record("m", "g", 2, 0.8, 20, 5)]
    # per repetition: 20, 5 and 25 tokens/s -> ratios 2.0, 0.5, 2.5 -> median 2.0 (not the ratio of means)
    assert speedup(method, baseline) == pytest.approx(2.0)
    assert speedup(baseline, baseline) == pytest.approx(1.0)
    assert speedup(method, []) is None


def test_summarize_rows_per_group_and_overall():
    measurements = []
    for repeat in range(2):
        measurements += [record("plain", "code", repeat, 1.0, 10, 10), record("plain", "math", repeat, 3.0, 30, 30),
                         record("fast", "code", repeat, 0.5, 10, 4), record("fast", "math", repeat, 3.0, 30, 15)]
    rows = summarize(measurements, ["plain", "fast"], ["code", "math"], "plain")
    plain, fast = rows
    assert plain["groups"]["code"]["speedup"] == pytest.approx(1.0)
    assert fast["groups"]["code"]["speedup"] == pytest.approx(2.0)
    assert fast["groups"]["math"]["speedup"] == pytest.approx(1.0)
    assert fast[OVERALL]["speedup"] == pytest.approx((40 / 3.5) / (40 / 4.0))
    assert fast["groups"]["code"]["mean_accepted_tokens"] == pytest.approx(2.5)
    assert fast[OVERALL]["mean_accepted_tokens"] == pytest.approx(80 / 38)
    assert fast[OVERALL]["tokens_per_second"] == pytest.approx(40 / 3.5)
    assert fast["identical"] is None  # identity not checked (sampling run)


def test_identity_check_marks_records_and_reports_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2
    measurements = [record("plain", "g", 0, 1.0, 3, 3), record("good", "g", 0, 1.0, 3, 1),
                    record("bad", "g", 0, 1.0, 3, 1), record("plain", "g", 1, 1.0, 3, 3)]
    outputs = {("plain", "g/a", 0): [1, 2, 3], ("good", "g/a", 0): [1, 2, 3], ("bad", "g/a", 0): [1, 9, 3],
               ("plain", "g/a", 1): [1, 2, 3]}
    mismatches = check_identity(measurements, outputs, "plain")
    assert [(m.method, m.item, m.position, m.expected_token, m.actual_token) for m in mismatches] == [
        ("bad", "g/a", 1, 2, 9)]
    assert [record.identical for record in measurements] == [True, True, False, True]
    rows = summarize(measurements, ["plain", "good", "bad"], ["g"], "plain")
    assert [row["identical"] for row in rows] == [True, True, False]


def test_interleaved_order_puts_every_method_in_every_position():
    methods = [Method(name, "x", lambda ids: ids) for name in "abc"]
    orders = [[method.name for method in interleaved_order(methods, step)] for step in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for position in range(3):
        assert {order[position] for order in orders} == {"a", "b", "c"}


def test_markdown_table_has_spec_bench_layout_and_shows_slowdowns():
    from hf_spec.bench.report import markdown

    measurements = []
    for repeat in range(2):
        measurements += [record("plain", "code", repeat, 1.0, 10, 10), record("slow", "code", repeat, 2.0, 10, 8)]
    rows = summarize(measurements, ["plain", "slow"], ["code"], "plain")
    rows[1]["lossless"] = False
    table = markdown(rows, ["code"], "header", greedy=False, skipped={"x": "needs a draft model"})
    lines = table.splitlines()
    assert lines[0] == "header"
    assert lines[2] == "| Method | Code | Overall | Mean accepted tokens |"
    assert lines[4] == "| plain | 1.00x | 1.00x | 1.00 |"
    assert lines[5] == "| slow (lossy) | 0.50x | 0.50x | 1.25 |"
    assert "Not measured: x (needs a draft model)." in table


def test_per_depth_acceptance_pools_every_step_of_a_method_and_is_tabulated():
    from hf_spec.bench.report import markdown
    from hf_spec.engine.stats import GenerationStats

    stats = GenerationStats()
    for accepted in (0, 1, 3, 3):
        stats.record_step(drafted=4, accepted=accepted, emitted=accepted + 1)
    assert stats.steps_by_accepted == {0: 1, 1: 1, 3: 2}
    assert [stats.accepted_at_least(d) for d in (1, 2, 3, 4)] == [0.75, 0.5, 0.5, 0.0]
    tree = record("tree", "code", 0, 1.0, 12, 4)
    tree.steps_by_accepted = dict(stats.steps_by_accepted)
    other = record("tree", "qa", 0, 1.0, 2, 2)
    other.steps_by_accepted = {"0": 2}  # as read back from results.json
    rows = summarize([record("plain", "code", 0, 1.0, 10, 10), tree, other], ["plain", "tree"], ["code", "qa"], "plain")
    assert rows[0]["accepted_at_least"] is None  # steps it cannot see (transformers' methods, plain)
    assert rows[1]["accepted_at_least"] == pytest.approx([3 / 6, 2 / 6, 2 / 6])
    table = markdown(rows, ["code", "qa"], "header", greedy=False)
    assert "| Method | d=1 | d=2 | d=3 |" in table and "| tree | 0.50 | 0.33 | 0.33 |" in table
    assert "| plain | " not in table.split("at least *d*")[1]
