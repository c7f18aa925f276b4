"""Offloading to CPU and disk, the one-machine form of sharding (C14): weights move, answers don't.

Each check loads the plain path with a device map that sends part of the model to the CPU (on a
GPU runner) and to disk, and then requires four things:
- every parameter is where ``hf_device_map`` says, and an offloaded one is served from that
  storage with the in-memory model's values;
- no computation touched a weight left on the meta device;
- logits and greedy generation are bitwise equal to the in-memory model's, because the same
  kernels run on the same device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conformance import placement, routing
from conformance.cases import Case
from conformance.running import Loaded, LoadError, ModelCache
from conformance.variants import KINDS, REFERENCE, REGISTRY

# the plain path, placed, on every kind of model (an encoder-decoder's encoder and decoder stacks
# are units of the map like a decoder's layers); the checks verify C14 themselves, not the
# reference path's REF
PLAIN = {"variant_filter": lambda variant: variant.reference, "claims": ("C14",), "kinds": KINDS}
# transformers' documented refusal: disk offload of weights it cannot memory-map needs a folder
NEEDS_FOLDER = ("offloaded to the disk", "offload_folder")
# transformers' documented refusal of device_map="auto" for a class without _no_split_modules
NO_AUTO_MAP = "does not support `device_map="


def _fail(case: Case, message: str) -> None:
    __tracebackhide__ = True
    pytest.fail(f"{case.id}: {message}", pytrace=False)


def _in_memory(cache: ModelCache, case: Case) -> Loaded:
    try:
        return cache.get(case.model, REGISTRY[REFERENCE], case.dtype)
    except LoadError as exc:
        _fail(case, f"the in-memory model does not load: {exc}")
        raise


def _place(case: Case, source: str, device: str, **placement_kwargs: Any) -> tuple[Loaded, float]:
    try:
        return placement.load_placed(case.model, case.variant, case.dtype, source, device,
                                     **placement_kwargs)
    except LoadError as exc:
        if NO_AUTO_MAP in str(exc):
            pytest.skip(str(exc))
        _fail(case, str(exc))
        raise


def placed_map(placed: Loaded) -> dict[str, Any]:
    """The map the load applied; transformers sets none when everything landed on one device."""
    return dict(getattr(placed.model, "hf_device_map", None) or {})


def _map_value(device: str) -> Any:
    """How a device map names a device: a GPU by its index, the CPU as "cpu"."""
    import torch

    return torch.device(device).index or 0 if device.startswith("cuda") else device


def tiered_map(model: Any, main_device: str, tiers: list[Any]) -> dict[str, Any]:
    """Units (embeddings, layers, norm, head) in order, split by bytes over `tiers`; a tied
    tensor's units follow the first of them (accelerate cannot separate tied weights)."""
    names = placement.units(model)
    sizes = placement.unit_bytes(model, names)
    total, before, plan = sum(sizes.values()), 0, {}
    for name in names:
        middle = (before + sizes[name] / 2) / total
        plan[name] = tiers[min(int(middle * len(tiers)), len(tiers) - 1)]
        before += sizes[name]
    identity = dict(zip(names, names))
    for group in placement.tied_groups(model):
        owners = [placement.resolve(identity, name) for name in group]
        for owner in owners[1:]:
            plan[owner] = plan[owners[0]]
    return plan


def offload_tiers(main_device: str) -> list[Any]:
    """The main device, then CPU RAM (when the main device is a GPU), then disk."""
    main = _map_value(main_device)
    return [main, "disk"] if main == "cpu" else [main, "cpu", "disk"]


@pytest.fixture(scope="session")
def bin_checkpoints() -> dict[tuple[str, str], str]:
    return {}


def _bin_source(cache: dict[tuple[str, str], str], memory: Loaded, tmp: pytest.TempPathFactory) -> str:
    key = (memory.zoo.name, memory.dtype)
    if key not in cache:
        cache[key] = placement.bin_checkpoint(memory.model, tmp.mktemp(f"bin-{memory.zoo.name}"))
    return cache[key]


def _source(memory: Loaded, workdir: Path) -> str:
    from conformance.zoo import materialize

    return materialize(memory.zoo, workdir)


def same_answers(case: Case, placed: Loaded, memory: Loaded, metrics: dict[str, Any]) -> None:
    """Placement as mapped, no meta weight computed with, outputs and greedy tokens bitwise equal."""
    __tracebackhide__ = True
    problem = placement.compare_placed(placed, memory, metrics,
                                       placement.reference_weights(memory.model),
                                       placement.tied_groups(memory.model))
    if problem:
        _fail(case, problem)


@pytest.mark.C14
@pytest.mark.cases(**PLAIN)
def test_disk_offload(case: Case, model_cache: ModelCache, metrics: dict[str, Any],
                      tmp_path: Path) -> None:
    """An explicit map: the first layers stay, the rest go to disk, read from the checkpoint."""
    memory = _in_memory(model_cache, case)
    device_map = tiered_map(memory.model, memory.device, offload_tiers(memory.device))
    metrics["layout"] = "explicit map: main device, (CPU,) disk; weights read from the checkpoint"
    source = _source(memory, model_cache.workdir)
    folder: dict[str, Any] = {}
    if routing.experts_fused(memory.model):
        # transformers 5.x fuses a mixture of experts' per-expert weights into one tensor as it
        # loads, so they cannot be read from the checkpoint as saved: its documented refusal asks
        # for an offload_folder ("the model uses an internal weight format different than the one
        # saved (i.e. most MoE models)"); test_disk_offload_without_folder_is_refused asserts it
        folder = {"offload_folder": str(tmp_path / "offload")}
        metrics["layout"] = ("explicit map: main device, (CPU,) disk; experts converted at load, "
                             "so re-saved into offload_folder")
    placed, metrics["load_s"] = _place(case, source, memory.device, device_map=device_map, **folder)
    if "disk" not in placed_map(placed).values():
        _fail(case, f"nothing was offloaded to disk: hf_device_map = {placed_map(placed)}")
    same_answers(case, placed, memory, metrics)


@pytest.mark.C14
@pytest.mark.cases(**PLAIN)
def test_memory_cap_forces_disk_offload(case: Case, model_cache: ModelCache, metrics: dict[str, Any],
                                        bin_checkpoints: dict[tuple[str, str], str],
                                        tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """device_map="auto" with a max_memory cap smaller than the model: the rest goes to disk,
    re-saved into offload_folder (the checkpoint is a .bin accelerate cannot memory-map)."""
    memory = _in_memory(model_cache, case)
    size, largest = placement.accelerate_sizes(memory.model, placement.units(memory.model))
    tiers = offload_tiers(memory.device)[:-1]  # every capped device; disk takes the rest
    # below the model's size, so something must go to disk; accelerate keeps room for the
    # largest layer on the main device, so the caps leave that plus a share of the rest
    caps = {tier: largest + (size - largest) // (2 * len(tiers)) for tier in tiers}
    folder = tmp_path / "offload"
    before = placement.gpu_allocated()
    placed, metrics["load_s"] = _place(
        case, _bin_source(bin_checkpoints, memory, tmp_path_factory), memory.device,
        device_map="auto", max_memory=caps, offload_folder=str(folder))
    after = placement.gpu_allocated()
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    metrics.update({"layout": "device_map=auto, max_memory caps, offload_folder",
                    "model_bytes": size, "caps": {placement.device_key(k): v for k, v in caps.items()},
                    "offload_folder_files": len(files),
                    "offload_folder_bytes": sum(p.stat().st_size for p in files)})
    if "disk" not in placed_map(placed).values():
        _fail(case, f"max_memory={caps} below the model's {size} bytes did not offload to disk: "
                    f"hf_device_map = {placed_map(placed)}")
    if not files:
        _fail(case, f"weights were offloaded to disk, but {folder} holds no file")
    used: dict[str, int] = {}
    for tier in caps:
        key = placement.device_key(tier)
        used[key] = placement.resident_bytes(placed.model, "cpu") if key == "cpu" \
            else after.get(key, 0) - before.get(key, 0)
    metrics["memory_after_load"] = used
    over = {device: (n, caps[_map_value(device)]) for device, n in used.items()
            if n > caps[_map_value(device)]}
    if over:
        buffers = placement.resident_bytes(placed.model, "cpu", parameters=False)
        _fail(case, f"memory after load exceeds max_memory: {over} (bytes, cap); on the CPU "
                    f"{buffers} bytes are buffers, which stay resident for offloaded layers too")
    same_answers(case, placed, memory, metrics)


@pytest.mark.C14
@pytest.mark.cases(**{**PLAIN, "kinds": frozenset({"decoder", "seq2seq"})})
def test_tied_weights_offloaded(case: Case, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    """The input embedding and the output head it is tied to both on disk, the rest in memory."""
    memory = _in_memory(model_cache, case)
    groups = placement.tied_groups(memory.model)
    if not groups:
        pytest.skip(f"{case.model.name} ties no weights (tie_word_embeddings="
                    f"{getattr(memory.model.config, 'tie_word_embeddings', None)}): nothing to offload tied")
    names = placement.units(memory.model)
    identity = dict(zip(names, names))
    tied = {placement.resolve(identity, name) for group in groups for name in group}
    main = _map_value(memory.device)
    device_map = {name: "disk" if name in tied else main for name in names}
    metrics["layout"] = f"tied {sorted(tied)} on disk, the rest on {placement.device_key(main)}"
    metrics["tied"] = groups
    placed, metrics["load_s"] = _place(case, _source(memory, model_cache.workdir), memory.device,
                                       device_map=device_map)
    same_answers(case, placed, memory, metrics)


@pytest.mark.C14
@pytest.mark.cases(**PLAIN)
def test_disk_offload_without_folder_is_refused(case: Case, model_cache: ModelCache,
                                                metrics: dict[str, Any],
                                                bin_checkpoints: dict[tuple[str, str], str],
                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    """Weights that must be re-saved for disk offload, and no offload_folder: the documented
    one-line error, not a half-loaded model."""
    memory = _in_memory(model_cache, case)
    device_map = tiered_map(memory.model, memory.device, offload_tiers(memory.device))
    source = _bin_source(bin_checkpoints, memory, tmp_path_factory)
    try:
        placed, _ = placement.load_placed(case.model, case.variant, case.dtype, source,
                                          memory.device, device_map=device_map)
    except LoadError as exc:
        message = str(exc)
        metrics["error"] = message
        if "\n" in message or not all(fragment in message for fragment in NEEDS_FOLDER):
            _fail(case, f"refused, but not with the documented one-line error naming "
                        f"{' and '.join(NEEDS_FOLDER)}: {message!r}")
        return
    _fail(case, f"disk offload of a .bin checkpoint without offload_folder loaded "
                f"(hf_device_map = {placed_map(placed)}); the documented behaviour is a "
                "ValueError asking for an offload_folder")
