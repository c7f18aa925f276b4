"""The planted-fault catalogue: small, realistic wrong implementations, registered only for the
self-tests. Each names the check that must catch it and what its failure message must say.

Faults are registry records like any variant, so the suite runs them exactly as it runs a real
optimized path: nothing in the suite knows they are faults.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from conformance import variants
from conformance.variants import REGISTRY, Variant


@dataclass(frozen=True)
class Fault:
    variant: Variant
    control: str  # the healthy variant the fault imitates; it must pass the same selection
    model: str
    dtype: str
    padding: str  # test-id fragment selecting the padding the fault shows under
    caught_by: str  # check name (test function without "test_")
    message: str  # a fragment the failure message must contain
    description: str


@contextlib.contextmanager
def _patched_sdpa(wrapper: Callable[..., Any]) -> Iterator[None]:
    """Replace torch's SDPA for the duration of a forward (transformers looks it up per call)."""
    original = torch.nn.functional.scaled_dot_product_attention

    def patched(*args: Any, **kwargs: Any) -> Any:
        return wrapper(original, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _left_padded(mask: Any) -> bool:
    if mask is None or mask.dim() != 4:
        return False
    last_query_sees_first_key = mask[:, :, -1, 0]
    if mask.dtype == torch.bool:
        return bool((~last_query_sees_first_key).any())
    return bool((last_query_sees_first_key < -1).any())


def _ignore_mask_when_left_padded(sdpa: Any, q: Any, k: Any, v: Any, attn_mask: Any = None,
                                  **kw: Any) -> Any:
    if _left_padded(attn_mask):
        kw.pop("is_causal", None)
        return sdpa(q, k, v, attn_mask=None, is_causal=q.shape[-2] == k.shape[-2], **kw)
    return sdpa(q, k, v, attn_mask=attn_mask, **kw)


def _scale_off(sdpa: Any, q: Any, k: Any, v: Any, *args: Any, scale: Any = None, **kw: Any) -> Any:
    default = 1.0 / math.sqrt(q.shape[-1])
    return sdpa(q, k, v, *args, scale=(scale or default) * 1.05, **kw)


def _half_accumulation(sdpa: Any, q: Any, k: Any, v: Any, *args: Any, **kw: Any) -> Any:
    """A 'kernel' that silently computes in bfloat16 whatever it is given."""
    mask = kw.pop("attn_mask", args[0] if args else None)
    mask = mask.to(torch.bfloat16) if mask is not None and mask.is_floating_point() else mask
    out = sdpa(q.bfloat16(), k.bfloat16(), v.bfloat16(), attn_mask=mask, **kw)
    return out.to(q.dtype)


def _patched(wrapper: Callable[..., Any]) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    return lambda: _patched_sdpa(wrapper)


def _first_layer(model: Any) -> Any:
    for name in ("model.layers", "layers", "transformer.h", "h", "encoder.layer",
                 "transformer.layer", "gpt_neox.layers", "model.decoder.layers"):
        module = model
        try:
            for part in name.split("."):
                module = getattr(module, part)
        except AttributeError:
            continue
        return module[0]
    raise LookupError(f"no layer list found in {type(model).__name__}")


def _hook_first_layer(edit: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def post_load(model: Any) -> Any:
        def hook(module: Any, args: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (edit(output[0]), *output[1:])
            return edit(output)

        _first_layer(model).register_forward_hook(hook)
        return model

    return post_load


def _nan_at_padding(model: Any) -> Any:
    pad = model.config.pad_token_id or 0
    embeddings = model.get_input_embeddings()

    def hook(module: Any, args: Any, output: Any) -> Any:
        return output.masked_fill((args[0] == pad)[..., None], float("nan"))

    embeddings.register_forward_hook(hook)
    return model


def _positions_not_shifted(model: Any) -> Any:
    def pre_hook(module: Any, args: Any, kwargs: Any) -> Any:
        if kwargs.get("position_ids") is not None:
            ids = kwargs["input_ids"]
            kwargs["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return args, kwargs

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return model


def _upcast(model: Any) -> Any:
    return model.float()


def _noise(x: Any) -> Any:
    return x + 1e-3 * x.abs().mean() * torch.randn_like(x)


def _fault(base: str, fid: str, **changes: Any) -> Variant:
    return replace(REGISTRY[base], id=fid, claims=REGISTRY[base].claims, **changes)


FAULTS: list[Fault] = [
    Fault(_fault("sdpa", "fault_mask_ignored_left", context=_patched(_ignore_mask_when_left_padded)),
          "sdpa", "llama", "fp32", "pad_left", "logits", "max|variant - golden|",
          "attention ignores the padding mask, only for left-padded batches"),
    Fault(_fault("sdpa", "fault_softmax_scale", context=_patched(_scale_off)),
          "sdpa", "llama", "fp32", "nopad", "logits", "max|variant - golden|",
          "softmax scale off by 5%"),
    Fault(_fault("sdpa", "fault_half_accumulation", context=_patched(_half_accumulation)),
          "sdpa", "gpt2", "fp32", "nopad", "logits", "max|variant - golden|",
          "attention kernel silently computes in bfloat16"),
    Fault(_fault("sdpa", "fault_layer_perturbed",
                 post_load=_hook_first_layer(lambda x: x * (1 + 1e-3))),
          "sdpa", "llama", "fp32", "nopad", "logits", "max|variant - golden|",
          "one layer's output perturbed by a relative 1e-3"),
    Fault(_fault("sdpa", "fault_nan_from_padding", post_load=_nan_at_padding),
          "sdpa", "qwen2", "fp32", "pad_right", "logits", "non-finite output on real tokens",
          "NaN in padded positions leaks into real tokens"),
    Fault(_fault("sdpa", "fault_rows_mix",
                 post_load=_hook_first_layer(lambda x: x + 1e-2 * x.roll(1, dims=0))),
          "sdpa", "mistral", "fp32", "pad_right", "logits", "max|variant - golden|",
          "rows of a batch leak into each other"),
    Fault(_fault("sdpa", "fault_positions_not_shifted", post_load=_positions_not_shifted),
          "sdpa", "gpt2", "fp32", "pad_left", "logits", "max|variant - golden|",
          "position ids not shifted for left padding (gpt2: absolute positions; RoPE models are "
          "shift-invariant, so they cannot show this fault)"),
    Fault(_fault("sdpa", "fault_nondeterministic", post_load=_hook_first_layer(_noise)),
          "sdpa", "gpt_neox", "fp32", "nopad", "logits", "max|variant - golden|",
          "output carries run-to-run noise"),
    Fault(_fault("sdpa_flash", "fault_flash_falls_back_to_math",
                 context=REGISTRY["sdpa_math"].context),
          "sdpa_flash", "llama", "fp32", "nopad", "logits", "optimized path did not run",
          "forced flash backend silently runs the math backend"),
    Fault(_fault("sdpa", "fault_sdpa_runs_eager", load_kwargs=REGISTRY["eager"].load_kwargs),
          "sdpa", "bert", "fp32", "nopad", "logits", "optimized path did not run",
          "SDPA variant silently loads eager attention"),
    Fault(_fault("sdpa", "fault_silent_fp32", post_load=_upcast),
          "sdpa", "llama", "bf16", "nopad", "logits", "asked for bf16",
          "variant silently runs in float32 when asked for bfloat16"),
    Fault(_fault("bnb_int8", "fault_int8_not_quantized", load_kwargs=REGISTRY["sdpa"].load_kwargs,
                 place_with_device_map=False),
          "bnb_int8", "llama", "fp32", "nopad", "logits", "optimized path did not run",
          "8-bit variant silently loads full-precision weights"),
    Fault(_fault("bettertransformer", "fault_bettertransformer_noop", post_load=None,
                 needs=variants.Needs()),
          "eager", "roberta", "fp32", "pad_right", "logits", "optimized path did not run",
          "to_bettertransformer() leaves the encoder on the plain path"),
]


def register() -> None:
    """Add the faults to the registry (idempotent)."""
    for fault in FAULTS:
        REGISTRY[fault.variant.id] = fault.variant

register()
