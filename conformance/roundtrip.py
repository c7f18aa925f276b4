"""Round-trips (C07, C16): what "the same model" means after convert/reverse and save/reload.

"The same" is bitwise here: the same module tree (names and classes), the same state_dict (keys,
dtypes, shapes, bytes), the same quantization state (every field bitsandbytes keeps beside a
quantized weight), the same tied storage, and the same outputs. A round-trip changes where
bytes live, never what they are, so there is no tolerance to apply: one flipped bit is a bug.

Also here: the diagnosis of a damaged checkpoint, so that a load that fails names the cause
(a truncated file, a missing shard, a config that does not fit the weights) instead of the
library's symptom, and the damages the suite's own check plants to prove that.
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from conformance.variants import Variant
from conformance.zoo import ZooModel

# optimum's documented refusal to save a converted model (optimum/bettertransformer/transformation.py)
BT_SAVE_REFUSAL = "converted with `BetterTransformer`"
# transformers' refusal of CPU/disk offload for a bitsandbytes model (quantizer_bnb_4bit/8bit.py)
OFFLOAD_REFUSALS = ("Some modules are dispatched on the CPU or the disk",)
# kwargs that quantize while loading: a reload takes the quantization from the checkpoint instead
QUANTIZING = frozenset({"quantization_config", "load_in_8bit", "load_in_4bit"})
# bookkeeping attributes of bitsandbytes parameters that are not quantization state
NOT_STATE = frozenset({"module"})


# --- module trees and state dicts -------------------------------------------------------------


def module_tree(model: Any) -> list[tuple[str, str]]:
    """(qualified name, class) of every submodule, in registration order."""
    return [(name, f"{type(m).__module__}.{type(m).__qualname__}") for name, m in model.named_modules()]


def tree_difference(expected: list[tuple[str, str]], found: list[tuple[str, str]]) -> str | None:
    """None when both trees have the same names and classes, else what differs first."""
    want, got = dict(expected), dict(found)
    changed = [n for n in want if n in got and want[n] != got[n]]
    missing = [n for n in want if n not in got]
    extra = [n for n in got if n not in want]
    if not (changed or missing or extra):
        return None
    parts = []
    if changed:
        name = changed[0]
        parts.append(f"{len(changed)} module(s) of another class, first {name or '<root>'}: "
                     f"{_short(got[name])} (expected {_short(want[name])})")
    if missing:
        parts.append(f"{len(missing)} module(s) missing, first {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} unexpected module(s), first {extra[0]} ({_short(got[extra[0]])})")
    return "; ".join(parts)


def _short(qualified: str) -> str:
    return qualified.rsplit(".", 1)[-1]


def state_snapshot(model: Any) -> dict[str, Any]:
    """The state_dict as detached CPU copies (a later forward may repack weights in place)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def bitwise_equal(a: Any, b: Any) -> bool:
    """Same dtype, shape and bytes (NaN payloads and signed zeros included)."""
    import torch

    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    flat_a, flat_b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
    if flat_a.dtype == torch.bool:
        return torch.equal(flat_a, flat_b)
    return torch.equal(flat_a.contiguous().view(torch.uint8), flat_b.contiguous().view(torch.uint8))


def describe(tensor: Any) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}"


def state_difference(expected: dict[str, Any], found: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """Keys, dtypes, shapes and bytes of two state_dicts; the message names the first difference."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    differ = [k for k in expected if k in found and not bitwise_equal(expected[k], found[k])]
    figures = {"tensors_compared": len(expected), "tensors_differing": len(differ),
               "tensors_missing": len(missing), "tensors_unexpected": len(extra),
               "state_bytes": int(sum(t.numel() * t.element_size() for t in expected.values()))}
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing, first {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} unexpected tensor(s), first {extra[0]}")
    if differ:
        key = differ[0]
        a, b = expected[key], found[key]
        if a.dtype == b.dtype and a.shape == b.shape:
            what = f"values differ{_max_diff(a, b)}"
        else:
            what = f"{describe(b)} (expected {describe(a)})"
        parts.append(f"{len(differ)} tensor(s) differ, first {key}: {what}")
    return ("; ".join(parts) or None), figures


def _max_diff(a: Any, b: Any) -> str:
    import torch

    if not a.is_floating_point():
        return f" at {int((a != b).sum())} element(s)"
    diff = (a.double() - b.double()).abs()
    return f", max |diff| {float(torch.nan_to_num(diff, nan=float('inf')).max()):.3g}"


def output_difference(expected: Any, found: Any) -> tuple[str | None, dict[str, Any]]:
    """Outputs must be bitwise equal: the same weights through the same kernels."""
    import torch

    same = bitwise_equal(expected, found)
    figures: dict[str, Any] = {"outputs_bitwise_equal": same, "output_elements": int(expected.numel())}
    if same:
        figures["max_abs_output_diff"] = 0.0
        return None, figures
    if expected.shape != found.shape:
        return f"output shape {list(found.shape)} (expected {list(expected.shape)})", figures
    diff = torch.nan_to_num((expected - found).abs(), nan=float("inf"))
    figures["max_abs_output_diff"] = float(diff.max())
    figures["output_elements_differing"] = int((diff != 0).sum())
    return (f"outputs differ at {figures['output_elements_differing']} of {expected.numel()} "
            f"elements, max |diff| {figures['max_abs_output_diff']:.3g}"), figures


# --- tied embeddings --------------------------------------------------------------------------


def tied(model: Any) -> tuple[str, str] | None:
    """(output embedding, input embedding) parameter names when they share storage, else None."""
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if get_out is not None else None
    inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out is None or inp is None or getattr(out, "weight", None) is None:
        return None
    if out.weight.data_ptr() != inp.weight.data_ptr():
        return None
    names = {id(m): n for n, m in model.named_modules()}
    return f"{names.get(id(out), '?')}.weight", f"{names.get(id(inp), '?')}.weight"


def tie_difference(original: Any, reloaded: Any) -> str | None:
    """A tied head must come back tied (and an untied one untied)."""
    before, after = tied(original), tied(reloaded)
    if before and not after:
        return (f"tied embeddings came back untied: {before[0]} no longer shares storage with "
                f"{before[1]}")
    if after and not before:
        return f"untied embeddings came back tied: {after[0]} now shares storage with {after[1]}"
    return None


# --- quantization state -----------------------------------------------------------------------


def quant_states(model: Any) -> dict[str, dict[str, Any]]:
    """Per bitsandbytes-quantized module, every field kept beside its weight, as copies.

    4-bit: the Params4bit attributes and its QuantState (absmax, code, blocksize, quant_type,
    dtype, shape, offset, nested state2 ...); 8-bit: the Int8Params attributes (CB, SCB, ...).
    Read generically from the objects, so a field a new release adds is compared too.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or not (hasattr(weight, "quant_state") or hasattr(weight, "SCB")):
            continue
        fields = _fields(weight, "")
        state = getattr(module, "state", None)  # Linear8bitLt's MatmulLtState: the threshold
        if state is not None and hasattr(state, "threshold"):
            fields["state.threshold"] = state.threshold
        out[name] = fields
    return out


def _fields(obj: Any, prefix: str) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in sorted(vars(obj).items()):
        if key.startswith("_") or key in NOT_STATE:
            continue
        if hasattr(value, "absmax") and hasattr(value, "blocksize"):  # a (nested) QuantState
            fields.update(_fields(value, f"{prefix}{key}."))
        elif hasattr(value, "detach"):
            fields[prefix + key] = value.detach().to("cpu", copy=True)
        else:
            fields[prefix + key] = value
    return fields


def quant_difference(
    expected: dict[str, dict[str, Any]], found: dict[str, dict[str, Any]]
) -> tuple[str | None, dict[str, Any]]:
    """Every quantization-state field of every module equal (tensors bitwise)."""
    figures = {"quantized_modules": len(expected),
               "quant_fields_compared": sum(len(f) for f in expected.values())}
    missing = [m for m in expected if m not in found]
    if missing:
        return f"{len(missing)} quantized module(s) not quantized after reload, first {missing[0]}", figures
    for module, fields in expected.items():
        got = found[module]
        for key, want in fields.items():
            if key not in got:
                return f"{module}: quantization state field {key} is missing after reload", figures
            have = got[key]
            same = bitwise_equal(want, have) if hasattr(want, "detach") and hasattr(have, "detach") \
                else (not hasattr(want, "detach") and not hasattr(have, "detach") and want == have)
            if not same:
                return (f"{module}: quantization state field {key} differs: {_value(have)} "
                        f"(expected {_value(want)})"), figures
        extra = sorted(set(got) - set(fields))
        if extra:
            return f"{module}: unexpected quantization state field {extra[0]} after reload", figures
    return None, figures


def _value(value: Any) -> str:
    if hasattr(value, "detach"):
        return describe(value) if value.numel() > 1 else f"{describe(value)} = {value.item()!r}"
    return repr(value)


# --- save and reload --------------------------------------------------------------------------


def save(variant: Variant, model: Any, path: Path, **kwargs: Any) -> None:
    """The variant's save (save_pretrained unless the record says otherwise)."""
    (variant.save or _save_pretrained)(model, path, **kwargs)


def _save_pretrained(model: Any, path: Path, **kwargs: Any) -> None:
    model.save_pretrained(str(path), **kwargs)


def reload(
    zoo_model: ZooModel, variant: Variant, dtype: str, device: str, path: Path, workdir: Path,
    extra: dict[str, Any] | None = None, refusals: tuple[str, ...] = (),
) -> Any:
    """from_pretrained of a saved checkpoint as a user reloads it: the checkpoint's own config
    (its quantization included), ``dtype="auto"`` so a dtype that was not kept shows, the
    variant's attention implementation unless `extra` overrides it; then the variant's
    post_reload. Returns a running.Loaded; errors are running.LoadError (one line)."""
    from conformance import running
    from conformance.compat import dtype_kwarg

    def kwargs(torch_dtype: Any) -> dict[str, Any]:
        own = {k: v for k, v in variant.load_kwargs(torch_dtype).items() if k not in QUANTIZING}
        return {**own, **dtype_kwarg("auto"), **(extra or {})}

    saved = ZooModel(f"{zoo_model.name}-saved", zoo_model.kind, "user", str(path))
    again = replace(variant, load_kwargs=kwargs, post_load=None,
                    refusals=variant.refusals + refusals)
    with heap_frozen():
        loaded = running.load(saved, again, dtype, device, workdir)
    if variant.post_reload is not None:
        loaded.model = variant.post_reload(loaded.model)
    return loaded


@contextlib.contextmanager
def heap_frozen() -> Iterator[None]:
    """transformers 4.x runs gc.collect() after every shard it loads: in a process holding torch,
    transformers and optimum that is ~0.4 s a shard (measured, 4.48), seconds per sharded reload.
    Freezing the objects that exist before the load makes each collection scan only the
    loader's own; unfreezing hands them back to the collector unchanged."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def checkpoint_files(path: Path) -> dict[str, Any]:
    """What a save wrote: weight files by format, shards named in an index."""
    weights = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
    index = next(iter(sorted(path.glob("*.index.json"))), None)
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index else []
    return {
        "weight_files": weights,
        "safetensors": all(w.endswith(".safetensors") for w in weights) and bool(weights),
        "index": index.name if index else None,
        "shards": shards,
        "checkpoint_bytes": sum((path / w).stat().st_size for w in weights),
    }


# --- damaged checkpoints ----------------------------------------------------------------------


def _truncate(path: Path) -> str:
    file = max(path.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    return f"{file.name} cut to {len(data) // 2} of {len(data)} bytes"


def _drop_shard(path: Path) -> str:
    shards = checkpoint_files(path)["shards"]
    if len(shards) < 2:
        raise ValueError(f"{path} is not sharded: nothing to drop")
    (path / shards[1]).unlink()
    return f"removed {shards[1]} of {len(shards)} shards"


def _mismatch_config(path: Path) -> str:
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = int(config["vocab_size"]) + 64
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return f"config.json vocab_size set to {config['vocab_size']} (weights: {config['vocab_size'] - 64})"


# damage -> (how to plant it in a saved, sharded checkpoint, what the failure must name)
DAMAGES: dict[str, tuple[Callable[[Path], str], str]] = {
    "truncated_safetensors": (_truncate, "is truncated"),
    "missing_shard": (_drop_shard, "is missing"),
    "config_mismatch": (_mismatch_config, "config.json does not match the weights"),
}
