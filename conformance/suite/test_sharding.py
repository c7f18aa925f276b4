"""A model sharded over several GPUs gives the single-GPU answers, within per-GPU caps (C12, C14).

``device_map`` in "auto", "balanced", "balanced_low_0" and "sequential", with ``max_memory``
caps below the model's size, so the plan has to shard it. Then:
- every parameter lives where ``hf_device_map`` says;
- no GPU's ``torch.cuda.memory_allocated`` grew by more than its cap during the load;
- logits and greedy generation equal the single-GPU run. They are bitwise equal on GPUs of
  one model, where the same kernels run. On mixed GPUs they must be within the kernel
  tolerance of the golden run.

The same holds for 8-bit and 4-bit bitsandbytes models. These checks need two GPUs or more
(``multi_gpu``). They skip, with the reason, below that and in xdist workers pinned to one
GPU. Run them in the serial phase: ``pytest --pyargs conformance -m multi_gpu -p no:xdist``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conformance import compare, placement
from conformance.cases import Case
from conformance.checks import golden_outputs, load_or_fail, load_or_skip
from conformance.gpus import gpu_count
from conformance.running import LoadError, ModelCache

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# transformers refuses to put bitsandbytes-quantized modules on the CPU or disk (documented)
QUANTIZED_OFFLOAD_REFUSAL = "dispatched on the CPU or the disk"
PLAIN = {"variant_filter": lambda variant: variant.reference, "claims": ("C14",)}
QUANTIZED = {"variant_filter": lambda variant: variant.id in ("bnb_int8", "bnb_nf4"),
             "claims": ("C12", "C14")}


def _fail(case: Case, message: str) -> None:
    __tracebackhide__ = True
    pytest.fail(f"{case.id}: {message}", pytrace=False)


def gpu_caps(size: int, largest: int, gpus: int) -> dict[int, int]:
    """Per-GPU max_memory below the model's size: an even share, plus the largest layer that
    accelerate keeps free on the first GPU, plus 10% of the share for rounding."""
    share = size // gpus
    return dict.fromkeys(range(gpus), share + largest + share // 10)


def identical_gpus(indices: list[int]) -> bool:
    """Same model and compute capability: the same kernels run, so results must be bitwise equal."""
    import torch

    kinds = {(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i)) for i in indices}
    return len(kinds) == 1


def _close(case: Case, cache: ModelCache) -> Any:
    """Mixed GPUs: the sharded error against the golden run within the kernel (or quantization)
    tolerance, as test_logits judges a variant."""
    variant, reference, golden = load_or_fail(cache, case)
    batch = placement.FORWARD_BATCH
    expected = golden_outputs(cache, golden, batch)
    real = batch.mask().bool()

    def verdict(out: Any, single: Any) -> tuple[str | None, dict[str, Any]]:
        return compare.variant_verdict(case.variant, out, single, expected, real, case.dtype,
                                       case.model.kind)

    return verdict


def sharded_matches_single_gpu(case: Case, strategy: str, cache: ModelCache, metrics: dict[str, Any],
                               workdir: Path) -> None:
    import torch

    from conformance.zoo import materialize

    __tracebackhide__ = True
    if not cache.device.startswith("cuda"):
        pytest.skip(f"sharding over GPUs needs --device cuda (this run: {cache.device})")
    single = load_or_skip(lambda: cache.get(case.model, case.variant, case.dtype),
                          failure=f"{case.id}: the single-GPU model does not load: {{}}")
    gpus = gpu_count()
    size = placement.model_bytes(single.model)
    largest = max(placement.unit_bytes(single.model, placement.units(single.model)).values())
    caps = gpu_caps(size, largest, gpus)
    metrics.update({"strategy": strategy, "gpus": gpus, "model_bytes": size,
                    "largest_layer_bytes": largest, "caps": {f"cuda:{i}": c for i, c in caps.items()}})
    if min(caps.values()) >= size:
        pytest.skip(f"{case.model.name}: its largest layer ({largest} bytes) is too large a part "
                    f"of it ({size} bytes) for caps below its size: nothing would be sharded")
    for i in range(gpus):
        torch.cuda.reset_peak_memory_stats(i)
    before = placement.gpu_allocated()
    try:
        placed, metrics["load_s"] = placement.load_placed(
            case.model, case.variant, case.dtype, materialize(case.model, cache.workdir), "cuda:0",
            device_map=strategy, max_memory=caps, offload_folder=str(workdir / "offload"))
    except LoadError as exc:
        if QUANTIZED_OFFLOAD_REFUSAL in str(exc):
            pytest.skip(f"caps {caps} leave the quantized model no room on the GPUs once the library "
                        f"keeps its margins, and it refuses to offload quantized weights: {exc}")
        _fail(case, str(exc))
    after = placement.gpu_allocated()
    used = {device: after[device] - before.get(device, 0) for device in after}
    metrics["memory_after_load"] = used
    metrics["peak_during_load"] = {f"cuda:{i}": int(torch.cuda.max_memory_allocated(i)) -
                                   before.get(f"cuda:{i}", 0) for i in range(gpus)}
    try:
        over = {f"cuda:{i}": (used[f"cuda:{i}"], cap) for i, cap in caps.items()
                if used[f"cuda:{i}"] > cap}
        if over:
            _fail(case, f"device_map={strategy!r}: memory after load exceeds max_memory: {over} "
                        f"(bytes, cap); hf_device_map = {placed.model.hf_device_map}")
        on_gpus = sorted({int(key.split(":")[1]) for key in map(placement.device_key,
                          placed.model.hf_device_map.values()) if key.startswith("cuda:")})
        metrics["gpus_used"] = on_gpus
        close = None if identical_gpus(on_gpus or [0]) else _close(case, cache)
        metrics["bitwise"] = close is None
        quantized = not case.variant.kernel_class
        problem = placement.compare_placed(
            placed, single, metrics,
            None if quantized else placement.reference_weights(single.model),
            placement.tied_groups(single.model), close)
        if problem:
            _fail(case, f"device_map={strategy!r}: {problem}")
    finally:
        del placed
        placement.free_accelerator_memory()


@pytest.mark.C14
@pytest.mark.multi_gpu(2)
@pytest.mark.cases(**PLAIN)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sharded(case: Case, strategy: str, model_cache: ModelCache, metrics: dict[str, Any],
                 tmp_path: Path) -> None:
    sharded_matches_single_gpu(case, strategy, model_cache, metrics, tmp_path)


@pytest.mark.C12
@pytest.mark.C14
@pytest.mark.multi_gpu(2)
@pytest.mark.cases(**QUANTIZED)
def test_sharded_quantized(case: Case, model_cache: ModelCache, metrics: dict[str, Any],
                           tmp_path: Path) -> None:
    """The guides' C12 form: a quantized model, device_map="auto", per-GPU max_memory."""
    sharded_matches_single_gpu(case, "auto", model_cache, metrics, tmp_path)
