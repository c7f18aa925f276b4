"""The measurement harness: time and peak memory of a variant against its reference.

Budgets are ratios (reference time / variant time, variant peak / reference peak), so a busy
machine slows both sides alike: the two are measured *alternately in the same process* (rounds
in ABBA order, so a drift in machine load favours neither), after warm-up, and the harness keeps
adding rounds until the median ratio is stable (its relative IQR under a target) or a cap is hit.
It reports its own noise: the spread of the per-round ratios, which gating uses as its band.

A speed budget is a statistical decision, so a point that is judged against a limit (``compare(...,
limit=...)``) stops on another rule: the distribution-free confidence interval of the median
per-round ratio (``median_interval``: order statistics, binomial coverage) must lie wholly on one
side of the limit (``judge``: pass, fail), or the rounds run on to a larger cap
(``Policy.judged_max_rounds`` / ``judged_max_seconds``) and the point is *inconclusive*. The rounds'
ratios are not normal (a busy machine skews them, and they are bounded below by 0), and they are
not independent of the load's drift, which ABBA ordering cancels within a round; the median's
order-statistic interval needs only that rounds are exchangeable.

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

from conformance.outcomes import INCONCLUSIVE, judge


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
    # A judged point (compare(..., limit=...)) stops when the median's interval is wholly on one
    # side of the limit, else at these caps. 95% (2.5% per side): the usual error rate for a
    # healthy variant failed by noise and for a slowdown passed by it. The caps are computed, not
    # tuned: the CPU budget run that failed sdpa_math at 0.688 < 0.7 had 19.9% rel. IQR at seq
    # 512; at 60 rounds the 95% interval spans the 36th-64th percentiles of the rounds' ratios,
    # about 0.53 x their IQR (for a bell-shaped spread), so about +-5% of the median at 20% IQR:
    # enough to separate a 30% slowdown from its budget, for at most ~40 s per judged point.
    confidence: float = 0.95
    judged_max_rounds: int = 60
    judged_max_seconds: float = 40.0


CPU_POLICY = Policy()
CUDA_POLICY = Policy(warmup=3, min_rounds=10, max_rounds=100, target_rel_iqr=0.03, max_seconds=30.0,
                     min_sample_s=0.005, judged_max_rounds=200, judged_max_seconds=60.0)


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


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: (x_(k), x_(n+1-k)) of the sorted
    values, with k the largest rank such that P(Binomial(n, 1/2) <= k - 1) <= (1 - confidence) / 2.

    Each value falls below the true median with probability 1/2, whatever the distribution, so
    the count below it is Binomial(n, 1/2): the interval covers the median with probability at
    least `confidence`. Too few values to reach it (n < 6 at 95%): (-inf, inf), i.e. undecided.
    """
    n = len(values)
    tail = (1.0 - confidence) / 2.0
    k, cdf = 0, 0.0
    for j in range(n // 2 + 1):  # cdf = P(B <= j); rank j + 1 qualifies while P(B <= j) <= tail
        cdf += math.comb(n, j) / 2.0**n
        if cdf > tail:
            break
        k = j + 1
    if k == 0:
        return float("-inf"), float("inf")
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


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
    speed_interval: tuple[float, float] = (float("-inf"), float("inf"))  # of the median ratio
    confidence: float = 0.95

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
            "speed_ratio_lo": self.speed_interval[0],  # the median's confidence interval
            "speed_ratio_hi": self.speed_interval[1],
            "speed_confidence": self.confidence,
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
    limit: float | None = None,
) -> Comparison:
    """Measure `variant` against `reference` alternately until their ratio is stable, or, given a
    speed budget `limit` (a minimum ratio), until the ratio's interval is decided against it.

    Each round times reference, variant, variant, reference (ABBA), so a drift in machine load
    and any advantage of going first or second cancel within the round; the round's ratio is
    (sum of reference times) / (sum of variant times). A sample repeats the call `number` times
    (calibrated after warm-up so the faster side's sample lasts at least `min_sample_s`): a
    millisecond call timed alone on a shared machine is mostly scheduler noise.

    With `limit`, a point stops once `judge` is pass or fail (`converged` then means decided),
    else at the judged caps; without it, once the ratios' relative IQR is under the target.
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
    max_rounds = policy.max_rounds if limit is None else max(policy.max_rounds, policy.judged_max_rounds)
    max_seconds = policy.max_seconds if limit is None else max(policy.max_seconds,
                                                               policy.judged_max_seconds)
    while len(ratios) < max_rounds:
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
            if limit is None:
                done = Spread.of(ratios).rel_iqr <= policy.target_rel_iqr
            else:
                done = judge(median_interval(ratios, policy.confidence), limit) != INCONCLUSIVE
            if done:
                converged = True
                break
            if clock() - started > max_seconds:
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
        speed_interval=median_interval(ratios, policy.confidence),
        confidence=policy.confidence,
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
