"""Where a check's time goes, and how many loads and forwards it made.

Each check's wall time is split into loading (``from_pretrained`` and post-load steps), golden
forwards, reference forwards, variant forwards, proof counting (the variant's forwards that run
under the op counter, whose dispatch hook is most of their cost) and the rest (Hypothesis, the
verdicts, bookkeeping). It also counts loads, forwards and golden forwards. One ledger per process
is open at a time, for the test being run (pytest runs one test at a time per process; xdist
workers are processes), and a phase entered inside another phase is charged to the outer one.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PHASES = ("loading", "golden_forward", "reference_forward", "variant_forward", "proof_counting")
# loads: every from_pretrained (fresh copies a check needs included); cache_loads: those the
# model cache made, whose (model, variant, dtype) keys are kept to count reloads of one key;
# built: variants the cache built from the resident reference, sharing its weights (no read
# from disk: conformance/sharing.py), whose keys are kept too
COUNTS = ("loads", "cache_loads", "built", "forwards", "golden_forwards")


class Ledger:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self.active: str | None = None
        self.cache_keys: list[str] = []
        self.goldens: set[str] = set()

    def snapshot(self) -> dict[str, Any]:
        total = time.perf_counter() - self.started
        split = {phase: round(self.seconds[phase], 4) for phase in PHASES}
        split["rest"] = round(max(0.0, total - sum(self.seconds.values())), 4)
        found = {"time_split_s": split, "counts": {name: self.counts[name] for name in COUNTS}}
        if self.cache_keys:
            found["cache_loaded"] = list(self.cache_keys)
        if self.goldens:
            found["golden"] = sorted(self.goldens)
        return found


_LEDGER: dict[str, Ledger | None] = {"current": None}


def open_ledger() -> None:
    _LEDGER["current"] = Ledger()


def close_ledger() -> dict[str, Any] | None:
    ledger, _LEDGER["current"] = _LEDGER["current"], None
    return ledger.snapshot() if ledger is not None else None


def cache_load(key: str, from_disk: bool = True) -> None:
    """The model cache is loading `key` ("model/variant/dtype/device"), or building it from the
    resident reference (`from_disk` False: counted as built, by `built_from`)."""
    ledger = _LEDGER["current"]
    if ledger is not None:
        if from_disk:
            ledger.counts["cache_loads"] += 1
        ledger.cache_keys.append(key)


def golden_used(which: str) -> None:
    """The check judges against this golden run ("eager fp64 on cpu", sizing.golden_choice)."""
    ledger = _LEDGER["current"]
    if ledger is not None:
        ledger.goldens.add(which)


def count(**counts: int) -> None:
    """Add `counts` to the ledger without charging time (what happened, once it did)."""
    ledger = _LEDGER["current"]
    if ledger is not None:
        ledger.counts.update(counts)


@contextmanager
def spend(phase: str, **counts: int) -> Iterator[None]:
    """Charge the time inside to `phase` (unless another phase is already running) and add
    `counts` to the ledger."""
    ledger = _LEDGER["current"]
    if ledger is None:
        yield
        return
    ledger.counts.update(counts)
    if ledger.active is not None:
        yield
        return
    ledger.active = phase
    started = time.perf_counter()
    try:
        yield
    finally:
        ledger.seconds[phase] += time.perf_counter() - started
        ledger.active = None


def forward_phase(loaded: Any, counted: bool = False) -> Any:
    """The phase a forward of `loaded` belongs to, counted as one forward (a golden one too)."""
    variant = loaded.variant
    golden = variant.id.startswith("golden")
    if golden:
        return spend("golden_forward", forwards=1, golden_forwards=1)
    if counted:
        return spend("proof_counting", forwards=1)
    return spend("reference_forward" if variant.reference else "variant_forward", forwards=1)


def totals(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's split and counts: the sum over its records."""
    split: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    keys: Counter[str] = Counter()
    goldens: Counter[str] = Counter()
    for record in records:
        metrics = record.get("metrics", {})
        split.update(metrics.get("time_split_s", {}))
        counts.update(metrics.get("counts", {}))
        keys.update(metrics.get("cache_loaded", ()))
        goldens.update(metrics.get("golden", ()))
    counts["cache_keys"] = len(keys)  # distinct (model, variant, dtype, device) the cache loaded
    counts["cache_reloads"] = sum(keys.values()) - len(keys)  # one key loaded again
    return {"time_split_s": {k: round(v, 2) for k, v in split.items()}, "counts": dict(counts),
            "most_reloaded": [f"{key} x{n}" for key, n in keys.most_common(5) if n > 1],
            "golden": dict(goldens.most_common())}  # which golden run, in how many checks


def counts_line(counts: dict[str, int]) -> str:
    """The run's counts in words: the terminal summary and report.md/html say the same."""
    return (f"{counts.get('loads', 0)} loads ({counts.get('cache_loads', 0)} by the model cache, "
            f"of {counts.get('cache_keys', 0)} model/variant/dtype: "
            f"{counts.get('cache_reloads', 0)} reloads), {counts.get('built', 0)} variants built "
            f"from a resident reference, {counts.get('forwards', 0)} forwards "
            f"({counts.get('golden_forwards', 0)} golden)")


def golden_line(goldens: dict[str, int]) -> str:
    """Which golden runs judged the checks (sizing.golden_choice), in words."""
    return ", ".join(f"{which} ({n} checks)" for which, n in goldens.items()) or "none"
