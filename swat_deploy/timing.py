"""Timing several ways of doing the same work fairly on a small, shared, noisy machine."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, budget_s: float = 20.0,
                     per_turn: int = 3, stat: Callable[[list[float]], float] = statistics.median, *,
                     rounds_for: Callable[[float], int] | None = None,
                     drop_after_first: Callable[[dict[str, float]], set[str]] | None = None,
                     ) -> dict[str, tuple[float, int]]:
    """name -> (median seconds, rounds): every function `per_turn` times per round, engine
    order alternating between rounds; the first call of each turn is not timed. ``stat``
    replaces the median (e.g. a lower quartile, to see through short bursts of other load).

    Why turns: engines interfere. The first call after another engine ran finds its weights
    evicted from cache and its thread pool asleep (measured: onnxruntime 6.8 ms alone, 9.9 ms
    when every call alternated with ours), which is not how a deployed model runs. The untimed
    call absorbs the switch; alternating rounds still spread drift and load over all engines.
    One warm-up call each first; rounds are cut to fit `budget_s` (at least 3).

    ``rounds_for``: the number of rounds given the seconds one round is expected to take (from
    the warm-up calls), replacing the rule above. ``drop_after_first``: given each function's
    best time after the first round, the names timed no further (they cannot win); dropped
    names are left out of the result.
    """
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    per_turn = max(per_turn, 1)
    per_round = per_turn * sum(first.values())
    if rounds_for is not None:
        rounds = rounds_for(per_round)
    else:
        rounds = max(3, min(repeats, int(budget_s / max(per_round, 1e-6))))
    times: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            for i in range(per_turn):
                t0 = time.perf_counter()
                fns[name]()
                if i or per_turn == 1:
                    times[name].append(time.perf_counter() - t0)
        if r == 0 and drop_after_first is not None:
            gone = drop_after_first({n: min([first[n], *times[n]]) for n in names})
            names = [n for n in names if n not in gone]
    return {n: (stat(times[n]), rounds) for n in names}


def lower_quartile(values: list[float]) -> float:
    """The 25th percentile: what a run costs when no other process got in the way."""
    return statistics.quantiles(values, n=4, method="inclusive")[0] if len(values) > 1 else values[0]
