"""A pytest plugin for the self-tests: the budget checks' rounds take their ratios from the
environment variable CONFORMANCE_FAKE_RATIOS (comma-separated, cycled: round i's ratio is the
i-th), so that a verdict's interval is chosen, not measured. Nothing is timed; the forwards still
run for warm-up, so the suite's own path (proof, sweep, verdicts, report) is the real one.
Loaded with ``-p fake_meter``; importing this module changes nothing."""

from __future__ import annotations

import os
from typing import Any

import pytest

from conformance.measure import bench

RATIOS = "CONFORMANCE_FAKE_RATIOS"


class RatioMeter(bench.Meter):
    """Calls in the order bench.compare makes them: calibration (variant, reference), then ABBA
    rounds. Reference samples 'take' the round's ratio in seconds, variant samples 1 s."""

    memory_method = "fake (tests/fake_meter.py)"

    def __init__(self, ratios: list[float]) -> None:
        self.ratios = ratios
        self.calls = 0

    def timed(self, fn: Any) -> tuple[float, int | None]:
        index, self.calls = self.calls - 2, self.calls + 1
        if index < 0 or index % 4 in (1, 2):
            return 1.0, None
        return self.ratios[(index // 4) % len(self.ratios)], None

    def peak(self, fn: Any) -> int:
        return 1000


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    ratios = [float(r) for r in os.environ.get(RATIOS, "").split(",") if r.strip()]
    if not ratios:
        return
    original = bench.compare

    def compare(variant: Any, reference: Any, meter: bench.Meter, *args: Any, **kwargs: Any) -> Any:
        return original(variant, reference, RatioMeter(ratios), *args, **kwargs)

    bench.compare = compare  # type: ignore[assignment]
