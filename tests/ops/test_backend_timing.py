"""MeasuredChoice: one timing per shape key, the fastest kept, one log line, no timing while forbidden.

Fake timings: each candidate returns its own "seconds", and the injected timer calls it and counts."""
import logging

import pytest
import torch

from megatron_evomoe.ops.backend_timing import MeasuredChoice, ShapeKey, rows_bucket


def _key(rows=16384, phase="fwd", k=2048, n=5632):
    return ShapeKey(phase, rows_bucket(rows), k, n, 4, "bfloat16", "cuda:0")


class CountingTimer:
    def __init__(self):
        self.calls = []

    def __call__(self, name, fn):
        self.calls.append(name)
        return fn()


def _log_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "megatron_evomoe.ops"]


def test_rows_bucket_is_the_next_power_of_two():
    assert [rows_bucket(n) for n in (0, 1, 2, 3, 1000, 16384, 16385)] == [1, 1, 2, 4, 1024, 16384, 32768]


def test_fastest_is_chosen_once_per_key_and_logged_once(caplog):
    timer = CountingTimer()
    choice = MeasuredChoice("grouped_mm", timer=timer, forbidden=lambda: False)
    candidates = {"triton": lambda: 2e-3, "triton_tma": lambda: 1.5e-3, "torch": lambda: 1.75e-3}
    with caplog.at_level(logging.INFO, logger="megatron_evomoe.ops"):
        picks = [choice.choose(_key(rows), candidates, "triton") for rows in (16000, 16384, 9000)]
    assert picks == ["triton_tma"] * 3
    assert timer.calls == ["triton", "triton_tma", "torch"]  # 16000, 16384 and 9000 share the 16384 bucket
    assert _log_lines(caplog) == [
        "grouped_mm fwd rows<=16384 K=2048 N=5632 E=4 bfloat16 on cuda:0: using triton_tma "
        "(measured: triton_tma 1.500 ms, torch 1.750 ms, triton 2.000 ms)"]


def test_each_shape_and_phase_gets_its_own_choice(caplog):
    timer = CountingTimer()
    choice = MeasuredChoice("grouped_mm", timer=timer, forbidden=lambda: False)
    fast_torch = {"triton": lambda: 3.0, "torch": lambda: 1.0}
    fast_triton = {"triton": lambda: 1.0, "torch": lambda: 3.0}
    with caplog.at_level(logging.INFO, logger="megatron_evomoe.ops"):
        assert choice.choose(_key(phase="wgrad"), fast_torch, "triton") == "torch"
        assert choice.choose(_key(phase="fwd"), fast_triton, "torch") == "triton"
        assert choice.choose(_key(rows=40000, phase="wgrad"), fast_triton, "torch") == "triton"
        assert choice.choose(_key(phase="wgrad"), fast_triton, "triton") == "torch"  # cached, not re-timed
    assert len(timer.calls) == 6 and len(_log_lines(caplog)) == 3
    assert set(choice.choices) == {_key(phase="wgrad"), _key(phase="fwd"), _key(rows=40000, phase="wgrad")}


def test_a_failing_candidate_is_left_out_and_named(caplog):
    def refuses():
        raise NotImplementedError("torch._grouped_mm does not take these inputs here")

    choice = MeasuredChoice("grouped_mm", timer=CountingTimer(), forbidden=lambda: False)
    with caplog.at_level(logging.INFO, logger="megatron_evomoe.ops"):
        assert choice.choose(_key(), {"torch": refuses, "triton": lambda: 5.0}, "torch") == "triton"
    (line,) = _log_lines(caplog)
    assert line.endswith("using triton (measured: triton 5000.000 ms; torch failed "
                         "(NotImplementedError: torch._grouped_mm does not take these inputs here))")


def test_nothing_runs_falls_back_to_the_default_and_out_of_memory_propagates():
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory")

    choice = MeasuredChoice("grouped_mm", timer=CountingTimer(), forbidden=lambda: False)
    assert choice.choose(_key(), {"torch": lambda: (_ for _ in ()).throw(RuntimeError("no"))}, "triton") == "triton"
    with pytest.raises(torch.OutOfMemoryError):
        choice.choose(_key(rows=1), {"triton": oom}, "triton")


def test_no_timing_while_forbidden_and_nothing_cached(caplog):
    """Under CUDA graph capture or torch.compile tracing: the default, untimed, not remembered."""
    timer, forbidden = CountingTimer(), [True]
    choice = MeasuredChoice("grouped_mm", timer=timer, forbidden=lambda: forbidden[0])
    candidates = {"triton": lambda: 2.0, "torch": lambda: 1.0}
    with caplog.at_level(logging.INFO, logger="megatron_evomoe.ops"):
        assert choice.choose(_key(), candidates, "triton") == "triton"
        assert timer.calls == [] and choice.choices == {} and _log_lines(caplog) == []
        forbidden[0] = False
        assert choice.choose(_key(), candidates, "triton") == "torch"
    assert timer.calls == ["triton", "torch"] and len(_log_lines(caplog)) == 1


def test_default_forbidden_check_sees_torch_compile():
    from megatron_evomoe.ops.backend_timing import timing_forbidden

    seen = []

    def f(x):
        seen.append(timing_forbidden())  # runs while Dynamo traces (a constant for the graph)
        return x + 1

    torch.compile(f, backend="eager")(torch.ones(2))
    assert timing_forbidden() is False and seen and all(seen)
