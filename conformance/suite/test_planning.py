"""Device-map planning without the hardware (C12, C14): accelerate's plans for hypothetical GPUs.

``infer_auto_device_map`` plans on an empty (meta) model, so the promise behind sharding can be
checked on any machine. Every parameter gets a device, no device gets more than its cap, no
module the model declares unsplittable (``model._no_split_modules``) is cut, and tied weights
stay together. The caps are the guides' ``{0: "600MB", 1: "1GB"}`` scaled to each model, so
that the plan has to split.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from conformance import placement
from conformance.cases import Case
from conformance.compat import parse_dtype
from conformance.running import ModelCache
from conformance.variants import KINDS

PLANS = ("guide_caps", "balanced", "balanced_low_0")
PLAIN = {"variant_filter": lambda variant: variant.reference, "claims": ("C12", "C14"), "kinds": KINDS}


def empty_model(case: Case, cache: ModelCache) -> Any:
    """The case's model built on the meta device (no weights, no memory), tied as loaded."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from conformance.zoo import auto_class, materialize

    config = AutoConfig.from_pretrained(materialize(case.model, cache.workdir))
    with init_empty_weights():
        model = auto_class(case.model.kind).from_config(config)
    model.tie_weights()
    return model


def _kb(n: float) -> str:
    """A cap spelled the way the guides spell them ("600MB"), in decimal kilobytes."""
    return f"{int(n // 1000)}KB"


def caps_for(plan: str, size: int, largest: int) -> dict[Any, str]:
    """Hypothetical GPUs for a model of `size` bytes whose largest layer is `largest` bytes.

    guide_caps keeps the guides' 600:1000 ratio; GPU 0 gets room for the largest layer (accelerate
    keeps that much free on it) plus half of the rest, so the model cannot fit there alone.
    balanced gets two GPUs, neither able to hold the model, so the plan must use both.
    balanced_low_0 gets three that could each hold it all: GPU 0 must stay empty.
    """
    if plan == "guide_caps":
        unit = (size + largest) / 2 / 0.6
        return {0: _kb(0.6 * unit), 1: _kb(unit)}
    if plan == "balanced":
        return dict.fromkeys(range(2), _kb(largest + 0.75 * (size - largest)))
    return dict.fromkeys(range(3), _kb(2 * size))


def make_plan(model: Any, plan: str, caps: dict[Any, str], dtype: Any) -> dict[str, Any]:
    """The plan transformers makes for device_map=plan: balanced plans first lower the caps
    (get_balanced_memory), then accelerate fills devices in order (infer_auto_device_map)."""
    import accelerate
    import accelerate.utils

    no_split = placement.no_split_classes(model)
    max_memory: dict[Any, Any] = dict(caps)
    if plan != "guide_caps":
        max_memory = accelerate.utils.get_balanced_memory(
            model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
            low_zero=plan == "balanced_low_0")
    return dict(accelerate.infer_auto_device_map(model, max_memory=max_memory,
                                                 no_split_module_classes=no_split, dtype=dtype))


@pytest.mark.C12
@pytest.mark.C14
@pytest.mark.cases(**PLAIN)
@pytest.mark.parametrize("plan", PLANS)
def test_device_map_plan(case: Case, plan: str, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    import logging

    from accelerate.utils import convert_file_size_to_int

    dtype = parse_dtype(case.dtype)
    model = empty_model(case, model_cache)
    size, largest = placement.accelerate_sizes(model, placement.units(model), dtype)
    caps = caps_for(plan, size, largest)
    started = time.perf_counter()
    quiet = logging.getLogger("accelerate.utils.modeling")
    level, quiet.level = quiet.level, logging.ERROR  # "Device 0 is not available": hypothetical
    try:
        device_map = make_plan(model, plan, caps, dtype)
    except Exception as exc:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), "").strip()
        pytest.fail(f"{case.id}: accelerate cannot plan {plan} for hypothetical GPUs {caps} "
                    f"without the hardware: {type(exc).__name__}: {first[:200]}", pytrace=False)
    finally:
        quiet.level = level
    cap_bytes = {placement.device_key(k): convert_file_size_to_int(v) for k, v in caps.items()}
    problems, figures = placement.plan_problems(model, device_map, cap_bytes, dtype)
    used = figures["planned_bytes"]
    metrics.update(figures)
    metrics.update({"plan": plan, "caps_as_given": {str(k): v for k, v in caps.items()},
                    "accelerate_model_bytes": size, "largest_layer_bytes": largest,
                    "no_split_modules": placement.no_split_classes(model),
                    "device_map": {k: placement.device_key(v) for k, v in device_map.items()},
                    "plan_s": time.perf_counter() - started})
    gpus = sorted(cap_bytes)
    if plan == "guide_caps" and len(used) < 2:
        problems.append(f"the plan did not split: caps {caps} for {size} bytes put everything on "
                        f"{sorted(used)}")
    if plan == "balanced" and not all(used.get(gpu, 0) > 0 for gpu in gpus):
        problems.append(f"balanced left a GPU empty although neither can hold the model alone "
                        f"(caps {caps}, {size} bytes): {used}")
    if plan == "balanced_low_0" and used.get("cuda:0", 0) > 0:
        problems.append(f"balanced_low_0 put {used['cuda:0']} bytes on GPU 0 although GPU 1 "
                        f"alone could hold the model: {used}")
    if not placement.no_split_classes(model):
        metrics["no_split_checked"] = False  # the model declares none: nothing to keep whole
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        pytest.fail(f"{case.id} {plan}: {problems[0]}{more}", pytrace=False)
