"""meldkit.bench's timing rules: slow calls (the argsort baselines) are warmed up once and timed as
often as their budget allows, fast ones as often as the repeats say."""

from __future__ import annotations

import time

import meldkit.bench as mb


def counted(seconds):
    calls = []

    def fn():
        calls.append(1)
        if seconds:
            time.sleep(seconds)

    return fn, calls


def test_slow_calls_are_warmed_up_once_and_timed_within_their_budget(monkeypatch):
    monkeypatch.setattr(mb, "_SLOW_CALL_S", 0.05)
    monkeypatch.setattr(mb, "_SLOW_BUDGET_S", 0.25)
    fast, fast_calls = counted(0)
    slow, slow_calls = counted(0.1)
    slower, slower_calls = counted(0.3)
    noop = lambda: None  # noqa: E731
    t = mb.time_impls({"fast": fast, "slow": slow, "slower": slower}, "cpu", flush=noop, warmup=2)
    # The fast impl: 2 warm-ups, then the fitted repeats (at least 5).
    assert t["fast"].repeats >= mb._MIN_REPEATS and len(fast_calls) == 2 + t["fast"].repeats
    # 0.1 s calls: one warm-up, then as many as fit 0.25 s; 0.3 s calls: one warm-up, one timed.
    assert t["slow"].repeats == 2 and len(slow_calls) == 3
    assert t["slower"].repeats == 1 and len(slower_calls) == 2
    assert t["slower"].median_s >= 0.3 and t["slower"].iqr_s == 0
    # Repeats given by the caller hold for every impl; slow ones still warm up once.
    fast_calls.clear(), slow_calls.clear()
    t = mb.time_impls({"fast": fast, "slow": slow}, "cpu", flush=noop, warmup=2, repeats=3)
    assert (t["fast"].repeats, t["slow"].repeats) == (3, 3)
    assert (len(fast_calls), len(slow_calls)) == (5, 4)


def test_each_case_reaches_the_caller_as_it_finishes():
    seen = []
    rows = mb.run_op(
        "weighted_sum", "cpu", quick=True, repeats=1, warmup=1, progress=False, on_case=seen.append
    )
    assert len(seen) == len({(r["case"], r["dtype"]) for r in rows}) > 1
    assert [r for case_rows in seen for r in case_rows] == rows
