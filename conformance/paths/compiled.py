"""torch.compile as a variant: the compiled forward, and generation with a static KV cache.

The variant follows transformers' documentation: ``model.forward = torch.compile(model.forward)``
(default mode; ``mode="reduce-overhead"`` only on a GPU, where it captures CUDA graphs), and for
generation ``model.generation_config.cache_implementation = "static"`` with a full-graph compile.

Proof of path. The op-counting proof cannot be used: a ``TorchDispatchMode`` makes dynamo run
the frame eagerly (measured: under the op counter a compiled function dispatches its plain aten
ops and compiles nothing). So a compiled variant's proof runs the forward under the torch
profiler instead, and counts what only compiled code emits: one ``Torch-Compiled Region`` per
compiled frame that ran, and inductor's ``Call CompiledFxGraph`` for the kernels it generated.
A forward that ran more compiled regions than ``1 + allowed graph breaks`` broke its graph.

Compile time and run time are kept apart: every call of the compiled forward is timed, and a
call during which dynamo compiled a new graph counts as compile time, any other as run time.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from conformance.probes import Proof

OPT_IN = "CONFORMANCE_COMPILE"
REGION = "Torch-Compiled Region"
INDUCTOR_CALL = "CompiledFxGraph"
STATS = "_conformance_compile"  # the attribute a compiled model carries its timings in

# dynamo keeps compiled graphs per code object: every instance of a model class (each dtype, each
# compile variant) adds its graphs to the same cache as `LlamaForCausalLM.forward`'s, and shapes
# add more (batch 1 vs more, prefill vs decoding). torch's default limit (8, meant for one model
# in one process) would make the suite's later loads fall back to eager (or, with fullgraph,
# raise): the harness raises it. A fallback would still be caught by the proof.
RECOMPILE_LIMIT = 64

# a model that cannot take a static cache refuses the static-cache variant (a skip)
STATIC_REFUSAL = "does not support a static KV cache"


@dataclass
class CompileStats:
    """Wall time of the compiled forward's calls, split into compiling calls and plain runs."""

    compile_s: float = 0.0
    compiles: int = 0
    run_s: float = 0.0
    runs: int = 0
    last_run_s: float = 0.0

    def figures(self) -> dict[str, Any]:
        return {
            "compile_s": round(self.compile_s, 3),
            "compiling_calls": self.compiles,
            "run_s_mean": round(self.run_s / self.runs, 6) if self.runs else None,
            "run_s_last": round(self.last_run_s, 6),
            "runs": self.runs,
        }


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_forward(mode: str | None = None, fullgraph: bool = False,
                    static_cache: bool = False) -> Callable[[Any], Any]:
    """The registry's post_load: the documented compile of ``model.forward``, timed per call.

    ``mode="auto"``: ``reduce-overhead`` (CUDA graphs) on a GPU, the default mode elsewhere, as
    transformers' static-cache recipe does.
    """

    def post_load(model: Any) -> Any:
        import torch

        chosen = mode
        if mode == "auto":
            chosen = "reduce-overhead" if model.device.type == "cuda" else None

        if static_cache:
            reason = static_cache_missing(model)
            if reason:
                raise RuntimeError(reason)
            model.generation_config.cache_implementation = "static"
        _raise_recompile_limit()
        compiled = torch.compile(model.forward, mode=chosen, fullgraph=fullgraph)
        stats = CompileStats()

        @functools.wraps(model.forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            before = _graphs_compiled()
            start = time.perf_counter()
            out = compiled(*args, **kwargs)
            spent = time.perf_counter() - start
            if _graphs_compiled() > before:
                stats.compile_s += spent
                stats.compiles += 1
            else:
                stats.run_s += spent
                stats.runs += 1
                stats.last_run_s = spent
            return out

        model.forward = forward
        setattr(model, STATS, stats)
        return model

    return post_load


def _raise_recompile_limit() -> None:
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(int(getattr(config, name)), RECOMPILE_LIMIT))


def static_cache_missing(model: Any) -> str | None:
    """Why this model cannot take a static KV cache on this transformers, or None."""
    supported = getattr(model, "_supports_static_cache", None)  # transformers < 4.50 spelling
    if supported is None:
        supported = getattr(model, "_can_compile_fullgraph", False)
    return None if supported else f"{type(model).__name__} {STATIC_REFUSAL} on this transformers"


@dataclass
class CompileProbe:
    """Context manager around one forward: what compiled code ran, from the torch profiler."""

    events: Counter[str] = field(default_factory=Counter)
    graphs_before: int = 0
    graphs_after: int = 0
    _profiler: Any = None

    def __enter__(self) -> CompileProbe:
        from torch.profiler import ProfilerActivity, profile

        self.graphs_before = _graphs_compiled()
        self._profiler = profile(activities=[ProfilerActivity.CPU])
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._profiler.__exit__(*exc)
        self.graphs_after = _graphs_compiled()
        if exc[0] is None:
            for event in self._profiler.events():
                if event.name.startswith(REGION):
                    self.events[REGION] += 1
                elif INDUCTOR_CALL in event.name:
                    self.events[INDUCTOR_CALL] += 1

    def matching(self, patterns: tuple[str, ...]) -> dict[str, int]:
        """Same interface as OpCounter.matching, for reports that list what ran."""
        return {k: v for k, v in self.events.items() if k in patterns}


@dataclass(frozen=True)
class CompiledProof(Proof):
    """At least one compiled region ran (and, with inductor, its generated code was called);
    at most ``1 + max_graph_breaks`` regions per forward."""

    expect: tuple[str, ...] = (REGION,)
    minimum: str | int = 1
    max_graph_breaks: int = 0
    inductor: bool = True

    def probe(self) -> CompileProbe:
        return CompileProbe()

    def verdict(self, counter: Any, model: Any) -> tuple[str | None, dict[str, Any]]:
        regions = counter.events[REGION]
        kernels = counter.events[INDUCTOR_CALL]
        stats = getattr(model, STATS, None)
        figures: dict[str, Any] = {
            "compiled_regions_run": regions,
            "inductor_graph_calls": kernels,
            "graphs_compiled_this_call": counter.graphs_after - counter.graphs_before,
            "graphs_compiled_total": counter.graphs_after,
            "graph_breaks_total": _graph_breaks(),
            **(stats.figures() if stats is not None else {}),
        }
        if regions < 1:
            return (f"compiled path did not run: 0 '{REGION}' events in the forward ({self.what}); "
                    "the frame ran eagerly", figures)
        if self.inductor and kernels < 1:
            return (f"compiled path did not run inductor code: {regions} compiled region(s) but "
                    f"no '{INDUCTOR_CALL}' call ({self.what})", figures)
        if regions > 1 + self.max_graph_breaks:
            return (f"graph broke: {regions} compiled regions in one forward, at most "
                    f"{1 + self.max_graph_breaks} allowed ({self.max_graph_breaks} declared graph "
                    f"breaks; {self.what})", figures)
        return None, figures


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def opt_in_missing() -> str | None:
    """The compile variants run only when asked for: compiling is slow on CPU (inductor builds
    C++ for every graph: measured 11-50 s per graph on 2 shared cores, several graphs per model
    and dtype as shapes change), too slow for the quick run."""
    if os.environ.get(OPT_IN, "") not in ("", "0"):
        return None
    try:
        from hypothesis import settings

        if settings.get_current_profile_name() == "nightly":
            return None
    except Exception:  # pragma: no cover - hypothesis without the accessor
        pass
    return (f"torch.compile variants are opt-in (inductor compiles each graph for 11-50 s on CPU): "
            f"set {OPT_IN}=1 or use --hypothesis-profile nightly")


def cxx_compiler_missing() -> str | None:
    """Inductor's CPU code is C++: without a compiler the compile fails, which is not the path's
    fault."""
    candidates = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    if any(c and shutil.which(c) for c in candidates):
        return None
    return "needs a C++ compiler for inductor's CPU kernels (none of $CXX, g++, c++, clang++ found)"
