"""Planted faults in placement: offload hooks, device maps and the device-map planner.

Loaded as a plugin (``-p faults_offload``) only by the self-tests. The offload faults are
registry records like any variant: the placed model's ``post_load`` sabotages accelerate's
hooks the way a broken offload implementation would, and the suite runs them like any path.
The planner faults wrap ``accelerate.infer_auto_device_map`` for one model class, chosen by
``--planted-planner-fault NAME:CLASS``. The other models in the same run are the healthy control.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch

from conformance.placement import device_key, no_split_classes, resolve
from conformance.variants import REGISTRY, Variant


@dataclass(frozen=True)
class PlacementFault:
    id: str
    description: str
    models: tuple[str, ...]  # --model values; the fault shows on the first
    select: str  # -k expression selecting the check under test
    caught_by: str  # check name (test function without "test_")
    message: str  # a fragment the failure message must contain
    variant: Variant | None = None  # an offload fault: runs beside the healthy "eager"
    planner: str | None = None  # a planner fault: --planted-planner-fault value


def _disk_offloaded(model: Any) -> list[tuple[str, Any, Any]]:
    """(name, module, hook) of modules whose weights accelerate serves from disk."""
    device_map = getattr(model, "hf_device_map", {}) or {}
    found = []
    for name, module in model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is None or not getattr(hook, "offload", False):
            continue
        if any(True for _ in module.parameters(recurse=False)) and \
                device_key(resolve(device_map, name + ".weight")) == "disk":
            found.append((name, module, hook))
    if not found:
        raise LookupError("no disk-offloaded module to sabotage: the layout offloads nothing")
    return found


def _layer_on_wrong_device(model: Any) -> Any:
    """The map says a layer is on disk; its weights silently stay resident in CPU RAM."""
    from accelerate.hooks import remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    _disk_offloaded(model)
    keep_whole = set(no_split_classes(model))
    on_disk = [key for key, device in model.hf_device_map.items() if device == "disk"]
    layer = next((key for key in on_disk
                  if type(model.get_submodule(key)).__name__ in keep_whole), on_disk[-1])
    for _, module in model.get_submodule(layer).named_modules():
        hook = getattr(module, "_hf_hook", None)
        if hook is None or not getattr(hook, "offload", False):
            continue
        for param_name, _ in list(module.named_parameters(recurse=False)):
            set_module_tensor_to_device(module, param_name, "cpu",
                                        value=hook.weights_map[param_name])
        remove_hook_from_module(module)
    return model


def _zeroing(weights: Any) -> Any:
    """The same weights map (same storage, same prefix) serving zeros for "weight"."""
    from accelerate.utils.offload import PrefixedDataset

    class Zeroed(PrefixedDataset):
        def __getitem__(self, key: str) -> Any:
            value = super().__getitem__(key)
            return torch.zeros_like(value) if key == "weight" else value

    return Zeroed(weights.dataset, weights.prefix)


def _zeroed(position: int) -> Callable[[Any], Any]:
    """The offloaded module at `position` (0: first, -1: last, the head) gets zero weights."""

    def post_load(model: Any) -> Any:
        _, _, hook = _disk_offloaded(model)[position]
        hook.weights_map = _zeroing(hook.weights_map)
        return model

    return post_load


def _skipped_layer(model: Any) -> Any:
    """One offload hook stops loading its module's weights: they stay on the meta device."""
    _, _, hook = _disk_offloaded(model)[0]

    def pre_forward(module: Any, *args: Any, **kwargs: Any) -> Any:
        hook.tied_pointers_to_remove = set()  # what post_forward expects pre_forward to leave
        return args, kwargs

    hook.pre_forward = pre_forward
    return model


def _fault(fid: str, post_load: Callable[[Any], Any]) -> Variant:
    return replace(REGISTRY["eager"], id=fid, post_load=post_load)


FAULTS: list[PlacementFault] = [
    PlacementFault("fault_offload_layer_on_wrong_device",
                   "the device map says disk, the layer's weights stay resident on the CPU",
                   ("llama",), "test_disk_offload and not without", "disk_offload",
                   "but hf_device_map puts", variant=_fault("fault_offload_layer_on_wrong_device",
                                                            _layer_on_wrong_device)),
    PlacementFault("fault_offload_zeroed_layer",
                   "an offload hook serves zeros for one layer's weights (stale offload)",
                   ("llama",), "test_disk_offload and not without", "disk_offload",
                   "differs from the in-memory model's weights",
                   variant=_fault("fault_offload_zeroed_layer", _zeroed(0))),
    PlacementFault("fault_offload_hook_skips_layer",
                   "an offload hook skips loading one layer's weights (left on meta)",
                   ("llama",), "test_disk_offload and not without", "disk_offload",
                   "an offloaded layer's weights were never loaded",
                   variant=_fault("fault_offload_hook_skips_layer", _skipped_layer)),
    PlacementFault("fault_tied_head_zeroed",
                   "the tied output head, offloaded, is served as zeros",
                   ("gpt2",), "tied_weights_offloaded", "tied_weights_offloaded",
                   "differs from the in-memory model's weights",
                   variant=_fault("fault_tied_head_zeroed", _zeroed(-1))),
    PlacementFault("planner_ignores_caps", "the planner ignores max_memory (10x the caps)",
                   ("llama", "opt"), "device_map_plan and guide_caps", "device_map_plan",
                   "> its cap", planner="ignore_caps:LlamaForCausalLM"),
    PlacementFault("planner_splits_block", "the planner cuts a no-split decoder layer in two",
                   ("llama", "opt"), "device_map_plan and guide_caps", "device_map_plan",
                   "is split over", planner="split_block:LlamaForCausalLM"),
]


def register() -> None:
    """Add the offload faults to the registry (idempotent)."""
    for fault in FAULTS:
        if fault.variant is not None:
            REGISTRY[fault.variant.id] = fault.variant



def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--planted-planner-fault", default=None, metavar="FAULT:CLASS",
                     help="self-tests only: make accelerate's planner faulty for one model class")


def _ignore_caps(plan: Callable[..., Any], model: Any, max_memory: Any = None, **kw: Any) -> Any:
    from accelerate.utils import convert_file_size_to_int

    loose = {k: 10 * convert_file_size_to_int(v) for k, v in (max_memory or {}).items()}
    return plan(model, max_memory=loose, **kw)


def _split_block(plan: Callable[..., Any], model: Any, max_memory: Any = None, **kw: Any) -> Any:
    """The plan, with the last tensor of the first no-split module moved to another device."""
    device_map = dict(plan(model, max_memory=max_memory, **kw))
    keep_whole = set(no_split_classes(model))
    block = next(name for name, module in model.named_modules()
                 if type(module).__name__ in keep_whole)
    tensors = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    per_tensor = {name: resolve(device_map, name) for name in tensors}
    inside = [name for name in tensors if name.startswith(block + ".")]
    device = per_tensor[inside[-1]]
    others = sorted({str(v) for v in device_map.values() if v != device}) or ["disk"]
    per_tensor[inside[-1]] = int(others[0]) if others[0].isdigit() else others[0]
    return per_tensor


PLANNER_FAULTS = {"ignore_caps": _ignore_caps, "split_block": _split_block}


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    register()  # only when loaded as a plugin (-p): importing this module changes nothing
    chosen = config.getoption("planted_planner_fault")
    if not chosen:
        return
    import accelerate

    fault, _, class_name = chosen.partition(":")
    original = accelerate.infer_auto_device_map

    @functools.wraps(original)
    def planner(model: Any, *args: Any, **kwargs: Any) -> Any:
        if type(model).__name__ == class_name:
            return PLANNER_FAULTS[fault](original, model, *args, **kwargs)
        return original(model, *args, **kwargs)

    accelerate.infer_auto_device_map = planner
