"""Planted round-trip faults (C07, C16): realistic wrong conversions, saves and reloads,
registered only for the self-tests. Each names the check that must catch it and what its
failure message must say.

Like tests/faults.py, each fault is a registry record (a variant with another ``reverse``,
``save`` or ``post_reload``), so the suite runs it exactly as it runs a real path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from conformance.variants import REGISTRY, Variant


@dataclass(frozen=True)
class RoundtripFault:
    variant: Variant
    control: str  # the healthy variant the fault imitates; it must pass the same selection
    model: str
    dtype: str
    caught_by: str  # check name (test function without "test_")
    message: str  # a fragment the failure message must contain
    description: str


def _reverse_leaving_one_converted(model: Any) -> Any:
    """reverse_bettertransformer(), then the first converted layer put back where it was."""
    name, layer = next((n, m) for n, m in model.named_modules()
                       if type(m).__module__.startswith("optimum.bettertransformer"))
    reversed_model = model.reverse_bettertransformer()
    parent_name, _, attr = name.rpartition(".")
    parent = reversed_model.get_submodule(parent_name) if parent_name else reversed_model
    if attr.isdigit():
        parent[int(attr)] = layer
    else:
        setattr(parent, attr, layer)
    return reversed_model


def _save_dropping_tied_head(model: Any, path: Path, **kwargs: Any) -> None:
    """save_pretrained leaves the tied head out of the weights; this save then also writes the
    config as untied, so nothing rebuilds the head on reload (it is freshly initialized)."""
    model.save_pretrained(str(path), **kwargs)
    config_file = Path(path) / "config.json"
    config = json.loads(config_file.read_text())
    config["tie_word_embeddings"] = False
    config_file.write_text(json.dumps(config, indent=2))


def _reload_losing_dq_offset(model: Any) -> Any:
    """A reload that drops the double-quantization offset of the first nested quant state."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and getattr(state, "nested", False):
            del state.offset
            return model
    raise LookupError("no double-quantized layer to damage")


def _fault(base: str, fid: str, **changes: Any) -> Variant:
    return replace(REGISTRY[base], id=fid, **changes)


FAULTS: list[RoundtripFault] = [
    RoundtripFault(
        _fault("bettertransformer", "fault_reverse_leaves_one_converted",
               reverse=_reverse_leaving_one_converted),
        "bettertransformer", "roberta", "fp32", "bettertransformer_roundtrip",
        "after reverse, module tree",
        "reverse_bettertransformer() leaves one layer converted"),
    RoundtripFault(
        _fault("eager", "fault_save_drops_tied_head", save=_save_dropping_tied_head),
        "eager", "gpt2", "fp32", "save_load", "tied embeddings came back untied",
        "a save that drops the tied head (config written untied)"),
    RoundtripFault(
        _fault("bnb_nf4_dq", "fault_reload_loses_quant_field", post_reload=_reload_losing_dq_offset),
        "bnb_nf4_dq", "llama", "fp32", "quantized_save_load",
        "quantization state field quant_state.offset is missing",
        "a reload that loses the double-quantization offset of one layer"),
]


def register() -> None:
    """Add the faults to the registry (idempotent)."""
    for fault in FAULTS:
        REGISTRY[fault.variant.id] = fault.variant


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Registered only when loaded as a plugin (-p): importing this module changes nothing."""
    register()
