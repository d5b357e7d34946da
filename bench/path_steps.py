"""The full path's two training patterns, timed the same way in every benchmark that reports them (issue 14).

bench_training and profile_pipeline used to time them differently and disagreed by ~10 % on "submitted ahead vs
one at a time" (0.90x against 1.01x): bench_training took the median of single steps one at a time (a slow step
drops out) but the mean of the submitted-ahead window (it cannot drop out), and the trainer's snapshots fell into
its windows zero, one or two times. Here both patterns are timed as whole windows of a multiple of the snapshot
cadence (window seconds / steps), one after the other after the same warm-up. Snapshots due by step count are
also spaced so that their writes fill at most `snapshot_write_share` of the time (trainer_consumer/durability.py):
a window then holds the snapshots a long run would have in that time only when it is long next to that spacing
(tens of steps for 1B and 8B: pass --steps 40 or more), and bench/bus_stack.py turns the time-triggered ones off.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from trainer_consumer.config import TrainerConfig

SNAPSHOT_EVERY = TrainerConfig().snapshot_every_steps
Around = Callable[[str], AbstractContextManager[Any]]  # wraps each timed window (e.g. py-spy of the stack)


def sdk_data(rows: np.ndarray) -> list:
    """SDK datums (tinker.types.Datum) predicting row[1:] from row[:-1] for each token row, every position weighted."""
    from tinker import types

    return [types.Datum(model_input=types.ModelInput.from_ints(row[:-1].tolist()),
                        loss_fn_inputs={"target_tokens": row[1:].astype(np.int64),
                                        "weights": np.ones(len(row) - 1, np.float32)}) for row in rows]


def sdk_adam() -> Any:
    """The AdamParams (tinker.types) every path benchmark steps with."""
    from tinker import types

    return types.AdamParams(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-8)


def window_steps(steps: int) -> int:
    """`steps` rounded up to a multiple of the snapshot cadence (at least one cadence)."""
    cadence = max(1, SNAPSHOT_EVERY)
    return max(1, -(-steps // cadence)) * cadence


def one_at_a_time(client: Any, data: list, adam: Any, steps: int) -> None:
    """forward_backward + optim_step submitted together, both awaited before the next step."""
    for _ in range(steps):
        fb, opt = client.forward_backward(data, "cross_entropy"), client.optim_step(adam)
        fb.result()
        opt.result()


def submitted_ahead(client: Any, data: list, adam: Any, steps: int) -> None:
    """Every step submitted before any is awaited (the cookbook's submit-ahead)."""
    futures = [(client.forward_backward(data, "cross_entropy"), client.optim_step(adam)) for _ in range(steps)]
    for fb, opt in futures:
        fb.result()
        opt.result()


def time_patterns(client: Any, data: list, adam: Any, steps: int, warmup: int,
                  around: Around = lambda _label: contextlib.nullcontext()) -> dict[str, float]:
    """Seconds per step of each pattern, {"one-at-a-time": s, "submitted-ahead": s}, over windows of
    window_steps(steps) steps after `warmup` steps one at a time."""
    one_at_a_time(client, data, adam, warmup)
    n = window_steps(steps)
    out = {}
    for label, run in (("one-at-a-time", one_at_a_time), ("submitted-ahead", submitted_ahead)):
        with around(label):
            t0 = time.perf_counter()
            run(client, data, adam, n)
            out[label] = (time.perf_counter() - t0) / n
    return out
