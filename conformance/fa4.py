"""Proof that FlashAttention-4 (``flash_attn.cute``, CuTe DSL) ran.

FA4's kernels are JIT-compiled CuTe kernels launched through tvm-ffi with raw device pointers,
not torch ops, so torch's dispatch mode (the suite's op counter) cannot see them. The probe
therefore counts calls of FA4's one forward entry, ``flash_attn.cute.interface._flash_attn_fwd``
(every public function reaches it: ``flash_attn_func`` and ``flash_attn_varlen_func`` through
their autograd Functions), for the duration of the measured forward, while the op counter keeps
forbidding the other paths (eager's softmax, any SDPA kernel): a model that silently runs SDPA
or eager fails, and so does one whose layers reach FA4 fewer times than it has layers.

On a GPU the probe also records the names of the CUDA kernels the forward launched, through
torch's profiler, so a run's report shows which launches are visible (the first H200 run
answers what the dispatch mode and profiler see of FA4; README "On a GPU runner").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from conformance.probes import OpCounter, Proof

ENTRY_MODULE = "flash_attn.cute.interface"
ENTRY = "_flash_attn_fwd"
CALLS = "flash_attn.cute.interface._flash_attn_fwd"


class EntryCounter(OpCounter):
    """The op counter, plus a count of FA4 forward-entry calls made while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self._module: Any = None
        self._original: Any = None
        self.kernels: dict[str, int] = {}
        self._profiler: Any = None

    def __enter__(self) -> EntryCounter:
        try:
            self._module = importlib.import_module(ENTRY_MODULE)
        except Exception:  # not importable: nothing is counted, and the verdict says so
            self._module = None
        if self._module is not None and hasattr(self._module, ENTRY):
            self._original = getattr(self._module, ENTRY)
            original, counts = self._original, self.counts

            def counted(*args: Any, **kwargs: Any) -> Any:
                counts[CALLS] += 1
                return original(*args, **kwargs)

            setattr(self._module, ENTRY, counted)
        self._start_profiler()
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._stop_profiler()
        if self._module is not None and self._original is not None:
            setattr(self._module, ENTRY, self._original)

    def _start_profiler(self) -> None:
        import torch

        if not torch.cuda.is_available():
            return
        from torch.profiler import ProfilerActivity, profile

        self._profiler = profile(activities=[ProfilerActivity.CUDA])
        self._profiler.__enter__()

    def _stop_profiler(self) -> None:
        if self._profiler is None:
            return
        import torch

        torch.cuda.synchronize()
        self._profiler.__exit__(None, None, None)
        names: dict[str, int] = {}
        for event in self._profiler.events():
            if getattr(event, "device_type", None) is not None and "CUDA" in str(event.device_type):
                names[event.name] = names.get(event.name, 0) + 1
        self.kernels = names


@dataclass(frozen=True)
class EntryProof(Proof):
    """At least one FA4 forward-entry call per attention layer; no eager or SDPA attention."""

    expect: tuple[str, ...] = (CALLS,)

    def probe(self) -> EntryCounter:
        return EntryCounter()

    def verdict(self, counter: Any, model: Any) -> tuple[str | None, dict[str, Any]]:
        problem, figures = super().verdict(counter, model)
        kernels = getattr(counter, "kernels", {})
        if kernels:
            figures["cuda_kernels"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12])
        return problem, figures
