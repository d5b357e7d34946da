"""The pure pieces of the path benchmarks (bench/call_latency.py, bench/path_steps.py, bench/path_ab.py): hop
arithmetic, the session trace's forward slices, percentiles, windows aligned to the snapshot cadence, and the
settings a comparison runs under."""

from __future__ import annotations

import os

import pytest

from bench.call_latency import CallClocks, call_data, forward_slices, percentile, summarize
from bench.path_ab import Config, ConfigResult, environment, parse_config
from bench.path_steps import SNAPSHOT_EVERY, window_steps


def test_hops_split_the_call_at_its_four_inner_clocks():
    hops = CallClocks(sdk_start=10.0, published=10.002, started=10.006, replied=10.016, sdk_end=10.025).hops()
    assert hops == pytest.approx({"submit": 2, "to work": 4, "compute": 10, "back": 9, "total": 25})


def test_a_step_continues_through_the_optim_step_and_times_the_big_reply_apart():
    hops = CallClocks(sdk_start=10.0, published=10.002, started=10.006, replied=10.106, sdk_end=10.140,
                      optim=(10.003, 10.107, 10.127), fb_end=10.115).hops()
    assert hops == pytest.approx({"submit": 2, "to work": 4, "compute": 100, "to optim": 1, "optim": 20, "back": 13,
                                  "total": 140, "fb back": 9})
    assert sum(v for k, v in hops.items() if k not in ("total", "fb back")) == pytest.approx(hops["total"])


def test_percentiles_are_nearest_rank_and_refuse_nothing_to_rank():
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.0) == 1 and percentile(values, 0.5) == 51 and percentile(values, 0.99) == 99
    assert percentile([7.0], 0.99) == 7
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)


def test_summaries_hold_p50_and_p99_per_hop():
    calls = [CallClocks(0.0, 0.001 * i, 0.002 * i, 0.003 * i, 0.004 * i) for i in range(1, 6)]
    summary = summarize(calls)
    assert summary["total"]["p50"] == pytest.approx(12) and summary["total"]["p99"] == pytest.approx(20)
    assert summary["total"]["mean"] == pytest.approx(12) and summary["submit"]["mean"] == pytest.approx(3)


def _slice(name: str, category: str, request_id: str, ts: int, dur: int) -> dict:
    return {"name": name, "cat": category, "ph": "X", "ts": ts, "dur": dur, "args": {"request_id": request_id}}


def test_forward_slices_pair_queue_and_compute_per_request_oldest_first():
    trace = {"traceEvents": [
        {"name": "process_name", "ph": "M", "args": {"name": "m"}},
        _slice("forward_backward queue", "queue", "b", 5_000_000, 1_000),
        _slice("forward_backward", "compute", "b", 5_001_000, 3_000),
        _slice("forward_backward queue", "queue", "a", 1_000_000, 2_000),
        _slice("forward_backward", "compute", "a", 1_002_000, 4_000),
        _slice("forward_backward queue", "queue", "refused", 2_000_000, 500),  # no compute slice: left out
        _slice("optim_step queue", "queue", "o", 3_000_000, 100),
        _slice("optim_step", "compute", "o", 3_000_100, 100),
    ]}
    got = forward_slices(trace)
    want = [(1.0, 1.002, 1.006), (5.0, 5.001, 5.004)]
    assert len(got) == len(want)
    for row, expected in zip(got, want, strict=True):
        assert row == pytest.approx(expected)
    assert forward_slices(trace, "optim_step") == [pytest.approx((3.0, 3.0001, 3.0002))]


def test_windows_are_whole_snapshot_cadences():
    assert window_steps(1) == SNAPSHOT_EVERY
    assert window_steps(SNAPSHOT_EVERY) == SNAPSHOT_EVERY
    assert window_steps(SNAPSHOT_EVERY + 1) == 2 * SNAPSHOT_EVERY


def test_call_data_holds_datums_of_the_asked_size_predicting_the_next_token():
    data = call_data(3, 5, vocab=50)
    assert len(data) == 3
    for datum in data:
        tokens = datum.model_input.to_ints()
        targets = datum.loss_fn_inputs["target_tokens"].to_numpy()
        assert len(tokens) == 5 and targets.shape == (5,) and max(tokens) < 50
        assert list(targets[:-1]) == tokens[1:]
        assert datum.loss_fn_inputs["weights"].to_numpy().tolist() == [1.0] * 5


def test_a_config_names_its_settings_and_an_empty_value_turns_one_off():
    assert parse_config("default") == Config("default", {})
    assert parse_config("both:TINKER_BUS_TRAINER_INTAKE_DOOR_HOST=,TINKER_BUS_GATEWAY_COMPRESS_FWDBWD=true") == Config(
        "both", {"TINKER_BUS_TRAINER_INTAKE_DOOR_HOST": "", "TINKER_BUS_GATEWAY_COMPRESS_FWDBWD": "true"})
    for bad in ("x:NOT_OURS=1", "x:TINKER_BUS_FETCH_MAX_WAIT_MS"):
        with pytest.raises(ValueError, match="is not TINKER_BUS_<NAME>=<value>"):
            parse_config(bad)


def test_a_config_may_run_its_stack_from_another_checkout(tmp_path):
    (tmp_path / "tinker_bus").mkdir()
    assert parse_config(f"before@{tmp_path}:TINKER_BUS_FETCH_MAX_WAIT_MS=5") == Config(
        "before", {"TINKER_BUS_FETCH_MAX_WAIT_MS": "5"}, tmp_path.resolve())
    assert parse_config(f"before@{tmp_path}").code == tmp_path.resolve()
    with pytest.raises(ValueError, match="is not a tinker-bus checkout"):
        parse_config(f"x@{tmp_path / 'nowhere'}")


def test_a_configs_environment_is_put_back_after_its_stack(monkeypatch):
    monkeypatch.setenv("TINKER_BUS_FETCH_MAX_WAIT_MS", "5")
    monkeypatch.delenv("TINKER_BUS_TRAINER_INTAKE_DOOR_HOST", raising=False)
    with environment({"TINKER_BUS_FETCH_MAX_WAIT_MS": "1", "TINKER_BUS_TRAINER_INTAKE_DOOR_HOST": ""}):
        assert os.environ["TINKER_BUS_FETCH_MAX_WAIT_MS"] == "1"
        assert os.environ["TINKER_BUS_TRAINER_INTAKE_DOOR_HOST"] == ""
    assert os.environ["TINKER_BUS_FETCH_MAX_WAIT_MS"] == "5"
    assert "TINKER_BUS_TRAINER_INTAKE_DOOR_HOST" not in os.environ


def test_a_configs_throughput_is_tokens_over_seconds_per_step_of_each_pattern():
    result = ConfigResult({"one-at-a-time": 0.25, "submitted-ahead": 0.2}, step_hops={}, tiny={})
    assert result.tok_s(16_000) == (64_000, 80_000)
