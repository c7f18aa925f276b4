"""The measurement harness: time and peak memory of a variant against its reference.

Budgets are ratios (reference time / variant time, variant peak / reference peak), so a busy
machine slows both sides alike: the two are measured *alternately in the same process* (rounds
in ABBA order, so a drift in machine load favours neither), after warm-up, and the harness keeps
adding rounds until the median ratio is stable (its relative IQR under a target) or a cap is hit.
It reports its own noise: the spread of the per-round ratios, which gating uses as its band.

Timing: on CUDA, CUDA events recorded around the call with a synchronize; on CPU,
``time.perf_counter``.

Peak memory (what the forward allocates on top of what was live before it):
- CUDA: ``torch.cuda.reset_peak_memory_stats`` before each timed call, then
  ``max_memory_allocated() - memory_allocated()`` (the caching allocator's own peak counter).
- CPU: torch's CPU allocator reports every allocation and free to the profiler when
  ``profile_memory=True``; replaying those events in time order gives the exact peak of live
  tensor bytes, kernel-internal buffers included. This is the CPU twin of the CUDA counter.
  RSS is not used: glibc keeps freed pages resident and reuses them, so an RSS delta reads ~0
  for a forward whose buffers were warmed up, and tracemalloc does not see torch's allocator.
  Profiling slows the call, so CPU memory is measured in separate, untimed calls (the
  allocator's event stream is deterministic: repeated calls give the same peak to the byte).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Policy:
    """How long to measure: warm-up calls, then ABBA rounds until the ratio's rel. IQR <= target
    (or `max_rounds` / `max_seconds` is reached: the point is then reported as not converged)."""

    warmup: int = 2
    min_rounds: int = 5
    max_rounds: int = 20
    target_rel_iqr: float = 0.10
    max_seconds: float = 15.0  # per measured point, after warm-up
    min_sample_s: float = 0.02  # a timed sample repeats the call until it lasts this long
    max_calls_per_sample: int = 50
    memory_calls: int = 1  # CPU: untimed profiled calls per side (deterministic)


CPU_POLICY = Policy()
CUDA_POLICY = Policy(warmup=3, min_rounds=10, max_rounds=100, target_rel_iqr=0.03, max_seconds=30.0,
                     min_sample_s=0.005)


def policy_for(device: str) -> Policy:
    return CUDA_POLICY if device.startswith("cuda") else CPU_POLICY


@dataclass(frozen=True)
class Spread:
    """Median and quartiles of repeated figures."""

    median: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        if not values:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        if len(values) == 1:
            return cls(values[0], values[0], values[0], 1)
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), q1, q3, len(values))

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def rel_iqr(self) -> float:
        return self.iqr / abs(self.median) if self.median else float("inf")


@dataclass
class Comparison:
    """One measured point: variant vs reference at one input shape."""

    variant_s: Spread
    reference_s: Spread
    speed_ratio: Spread  # per ABBA round: reference time / variant time (> 1: variant faster)
    variant_peak_bytes: int
    reference_peak_bytes: int
    converged: bool
    memory_method: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def memory_ratio(self) -> float:
        """variant peak / reference peak (< 1: the variant needs less)."""
        return self.variant_peak_bytes / self.reference_peak_bytes if self.reference_peak_bytes \
            else float("inf")

    @property
    def noise(self) -> float:
        """The harness's own noise for this point: relative IQR of the per-round ratios."""
        return self.speed_ratio.rel_iqr

    def as_metrics(self) -> dict[str, Any]:
        return {
            "speed_ratio": self.speed_ratio.median,
            "speed_ratio_q1": self.speed_ratio.q1,
            "speed_ratio_q3": self.speed_ratio.q3,
            "speed_noise": self.noise,
            "rounds": self.speed_ratio.n,
            "converged": self.converged,
            "variant_ms": self.variant_s.median * 1e3,
            "reference_ms": self.reference_s.median * 1e3,
            "variant_peak_bytes": self.variant_peak_bytes,
            "reference_peak_bytes": self.reference_peak_bytes,
            "memory_ratio": self.memory_ratio,
            "memory_method": self.memory_method,
            **self.extra,
        }


class Meter:
    """Times one call and reports its peak memory, the way the device allows."""

    memory_method = "none"

    def timed(self, fn: Callable[[], Any]) -> tuple[float, int | None]:
        raise NotImplementedError

    def peak(self, fn: Callable[[], Any]) -> int:
        raise NotImplementedError


class CpuMeter(Meter):
    memory_method = "torch CPU allocator events (profiler, profile_memory=True)"

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock

    def timed(self, fn: Callable[[], Any]) -> tuple[float, int | None]:
        start = self.clock()
        fn()
        return self.clock() - start, None

    def peak(self, fn: Callable[[], Any]) -> int:
        return cpu_peak_bytes(fn)


class CudaMeter(Meter):
    memory_method = "torch.cuda max_memory_allocated, reset per call"

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def timed(self, fn: Callable[[], Any]) -> tuple[float, int | None]:
        cuda = self.torch.cuda
        cuda.synchronize(self.device)
        cuda.reset_peak_memory_stats(self.device)
        before = cuda.memory_allocated(self.device)
        start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        cuda.synchronize(self.device)
        return start.elapsed_time(end) / 1e3, cuda.max_memory_allocated(self.device) - before

    def peak(self, fn: Callable[[], Any]) -> int:
        _, peak = self.timed(fn)
        return int(peak or 0)


def meter_for(device: str) -> Meter:
    return CudaMeter(device) if device.startswith("cuda") else CpuMeter()


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of live bytes torch's CPU allocator handed out during `fn` (see module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        if str(event.device_type()).endswith("CPU"):
            live += event.nbytes()
            peak = max(peak, live)
    return peak


def compare(
    variant: Callable[[], Any],
    reference: Callable[[], Any],
    meter: Meter,
    policy: Policy = CPU_POLICY,
    clock: Callable[[], float] = time.monotonic,
) -> Comparison:
    """Measure `variant` against `reference` alternately until their ratio is stable.

    Each round times reference, variant, variant, reference (ABBA), so a drift in machine load
    and any advantage of going first or second cancel within the round; the round's ratio is
    (sum of reference times) / (sum of variant times). A sample repeats the call `number` times
    (calibrated after warm-up so the faster side's sample lasts at least `min_sample_s`): a
    millisecond call timed alone on a shared machine is mostly scheduler noise.
    """
    for _ in range(policy.warmup):
        reference()
        variant()
    number = _calibrate(variant, reference, meter, policy)
    t_var: list[float] = []
    t_ref: list[float] = []
    peaks_var: list[int] = []
    peaks_ref: list[int] = []
    ratios: list[float] = []
    started = clock()
    converged = False
    sides = {"ref": (reference, t_ref, peaks_ref), "var": (variant, t_var, peaks_var)}
    while len(ratios) < policy.max_rounds:
        round_time = {"ref": 0.0, "var": 0.0}
        for side in ("ref", "var", "var", "ref"):
            fn, times, peaks = sides[side]
            seconds, peak = meter.timed(_repeat(fn, number))
            times.append(seconds / number)
            round_time[side] += seconds
            if peak is not None:
                peaks.append(peak)
        ratios.append(round_time["ref"] / round_time["var"] if round_time["var"] > 0 else float("inf"))
        if len(ratios) >= policy.min_rounds:
            if Spread.of(ratios).rel_iqr <= policy.target_rel_iqr:
                converged = True
                break
            if clock() - started > policy.max_seconds:
                break
    if not peaks_var:  # CPU: peak memory from separate, untimed calls
        peaks_var = [meter.peak(variant) for _ in range(policy.memory_calls)]
        peaks_ref = [meter.peak(reference) for _ in range(policy.memory_calls)]
    return Comparison(
        variant_s=Spread.of(t_var),
        reference_s=Spread.of(t_ref),
        speed_ratio=Spread.of(ratios),
        variant_peak_bytes=max(peaks_var),
        reference_peak_bytes=max(peaks_ref),
        converged=converged,
        memory_method=meter.memory_method,
        extra={"calls_per_sample": number},
    )


def _repeat(fn: Callable[[], Any], number: int) -> Callable[[], None]:
    if number == 1:
        return fn

    def repeated() -> None:
        for _ in range(number):
            fn()

    return repeated


def _calibrate(variant: Callable[[], Any], reference: Callable[[], Any], meter: Meter,
               policy: Policy) -> int:
    """Calls per sample, so that the faster side's sample lasts at least `min_sample_s`."""
    fastest = min(meter.timed(variant)[0], meter.timed(reference)[0])
    if fastest <= 0:
        return policy.max_calls_per_sample
    return max(1, min(policy.max_calls_per_sample, math.ceil(policy.min_sample_s / fastest)))


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x): the exponent of a power law y ~ x^k."""
    import math

    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(points) < 2:
        return float("nan")
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    sxx = sum((p[0] - mx) ** 2 for p in points)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in points)
    return sxy / sxx if sxx else float("nan")


def footprint_bytes(model: Any) -> int:
    """Bytes the model holds: parameters, buffers, and bitsandbytes' quantization state.

    ``get_memory_footprint()`` counts parameters and buffers only, which misses the absmax
    scales of 4-bit weights (kept in ``weight.quant_state``) and int8's per-row ``SCB``.
    Each storage is counted once. Measured as loaded: bitsandbytes' CPU backend repacks 4-bit
    state on the first forward (absmax to bfloat16), so the checks measure before running.
    """
    import torch

    seen: set[int] = set()
    total = 0

    def add(tensor: Any) -> None:
        nonlocal total
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            return
        seen.add(storage.data_ptr())
        total += storage.nbytes()

    for tensor in list(model.parameters()) + list(model.buffers()):
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                add(getattr(state, name, None))
            state = getattr(state, "state2", None) if getattr(state, "nested", False) else None
        for name in ("CB", "SCB"):
            add(getattr(tensor, name, None))
    for module in model.modules():  # LLM.int8 moves CB / SCB into the module's state on use
        state = getattr(module, "state", None)
        for name in ("CB", "SCB"):
            add(getattr(state, name, None))
    return total
