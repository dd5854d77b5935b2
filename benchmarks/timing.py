"""Measuring for the speed benchmark: interleaved timing, saved-activation bytes, robust
summaries (medians, paired ratios and the median's distribution-free interval)."""

from __future__ import annotations

import math
import os
import statistics
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn


@dataclass
class Contender:
    """One timed thing: ``step()`` is timed; ``setup()`` (untimed) runs before each call."""

    group: str
    name: str
    step: Callable[[], None]
    setup: Callable[[], None] = lambda: None
    times_ms: list[float] = field(default_factory=list)



class ForwardBackward(Protocol):
    """A training step split in two: ``loss()`` (the forward pass) and ``finish(loss)``."""

    model: nn.Module

    def loss(self) -> torch.Tensor: ...

    def finish(self, loss: torch.Tensor) -> None: ...


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_interleaved(contenders: Sequence[Contender], warmup: int, repeats: int,
                    device: torch.device, clock: str = "wall") -> None:
    """Time every contender once per round, in an order rotated each round, so slow drifts and
    bursts of machine load fall on all of them alike; the first ``warmup`` rounds are dropped.
    ``clock``: ``wall`` (perf_counter) or ``cpu`` (this process's CPU time, all its threads:
    time the OS gave to other processes is not counted, so a loaded machine inflates it far less
    — exact for one thread; with more, their spin-waits count)."""
    timer = time.process_time if clock == "cpu" else time.perf_counter
    n = len(contenders)
    for rnd in range(warmup + repeats):
        order = [contenders[(i + rnd) % n] for i in range(n)]
        for c in order:
            c.setup()
            _sync(device)
            t0 = timer()
            c.step()
            _sync(device)
            elapsed = (timer() - t0) * 1e3
            if rnd >= warmup:
                c.times_ms.append(elapsed)


def saved_activation_bytes(step: ForwardBackward) -> int:
    """Bytes autograd keeps for backward at the end of one training forward pass: every saved
    tensor still alive then (saved by branches that were dropped, e.g. a loss term computed and
    discarded, are not), counted once per storage, the model's parameters excluded (they live
    anyway). Deterministic for a given graph and batch — no allocator or timing noise."""
    refs: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step.loss()
        total = _alive_storage_bytes(refs, exclude=step.model.parameters())
        step.finish(loss)
    return total


def _alive_storage_bytes(refs: Sequence[weakref.ref], exclude: Iterable[torch.Tensor]) -> int:
    """Sum of storage sizes of the still-alive tensors, once per storage (all alive, so no
    address is shared by two different storages), storages of ``exclude`` left out."""
    excluded = {p.untyped_storage().data_ptr() for p in exclude}
    sizes: dict[int, int] = {}
    for ref in refs:
        t = ref()
        if t is None:
            continue
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without a plain storage
            continue
        if storage.data_ptr() not in excluded:
            sizes[storage.data_ptr()] = storage.nbytes()
    return sum(sizes.values())


def cuda_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak CUDA memory allocated during one step, above what was allocated before it."""
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - before


@dataclass
class Stats:
    median: float
    q1: float
    q3: float
    lo: float
    hi: float


def summarize(times: Sequence[float]) -> Stats:
    xs = sorted(times)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return Stats(statistics.median(xs), q1, q3, xs[0], xs[-1])


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ratio(num: float, den: float) -> float:
    return num / den if den > 0 else float("inf")


def round_ratios(a: Contender, b: Contender) -> list[float]:
    return [x / y for x, y in zip(a.times_ms, b.times_ms)]


def paired_ratio(a: Contender, b: Contender) -> float:
    """Median over rounds of a/b measured in the same round (robust to load drifting)."""
    return statistics.median(round_ratios(a, b))


def median_interval(values: Sequence[float], level: float = 0.95) -> list[float] | None:
    """Distribution-free confidence interval of the median: the order statistics
    ``[x_(k), x_(n+1−k)]`` with the largest ``k`` such that ``P(Binomial(n, ½) < k) ≤ (1 −
    level)/2``; None when ``n`` is too small for the level (n < 6 at 95 %)."""
    xs = sorted(values)
    n = len(xs)
    tail, k = 0.0, 0
    while k < n // 2:
        tail_next = tail + math.comb(n, k) / 2**n  # P(B <= k)
        if tail_next > (1.0 - level) / 2:
            break
        tail, k = tail_next, k + 1
    return None if k == 0 else [xs[k - 1], xs[n - k]]



def load_average() -> float | None:
    """The 1-minute load average (runnable processes), or None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None

