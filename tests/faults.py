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

import pytest
import torch

from conformance import variants
from conformance.localize import layer_list
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
        # transformers 4.x calls SDPA with query=/key=/value= keywords, 5.x positionally
        named = tuple(kwargs.pop(name) for name in ("query", "key", "value") if name in kwargs)
        return wrapper(original, *args, *named, **kwargs)

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


def _ones_mask_not_causal(model: Any) -> Any:
    """A 2D all-ones mask expanded to 4D without its causal part (decoders then see the future)."""
    def pre_hook(module: Any, args: Any, kwargs: Any) -> Any:
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2 and bool(mask.all()):
            batch, width = mask.shape
            kwargs["attention_mask"] = torch.zeros(batch, 1, width, width, dtype=model.dtype,
                                                   device=mask.device)
        return args, kwargs

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return model


def _packing_lost(model: Any) -> Any:
    """Packed rows lose their boundaries: restarting position_ids are renumbered 0..N-1."""
    def pre_hook(module: Any, args: Any, kwargs: Any) -> Any:
        if kwargs.get("attention_mask") is None and kwargs.get("position_ids") is not None:
            ids = kwargs["position_ids"]
            kwargs["position_ids"] = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
        return args, kwargs

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return model


def _cache_positions_stale(model: Any) -> Any:
    """Cached decoding steps get position ids one behind (an off-by-one in the cache offset).

    How generate() hands the cache over changed between releases (transformers 5.24 passes it as
    `cache=`, earlier ones as `past_key_values=`), and whether it passes position_ids too, so the
    fault reads either and derives the positions when absent: it must not depend on which."""
    def pre_hook(module: Any, args: Any, kwargs: Any) -> Any:
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = kwargs.get("cache")
        seen = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        if not seen:
            return args, kwargs
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        positions = kwargs.get("position_ids")
        if positions is None:
            if kwargs.get("cache_position") is not None:
                positions = kwargs["cache_position"][None]
            else:
                positions = torch.arange(seen, seen + ids.shape[-1], device=ids.device)[None]
            positions = positions.expand(ids.shape[0], -1)
        kwargs["position_ids"] = (positions - 1).clamp(min=0)
        return args, kwargs

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return model


def _cached_step_not_causal(sdpa: Any, q: Any, k: Any, v: Any, attn_mask: Any = None, **kw: Any) -> Any:
    """A cached step with several new tokens drops its mask: the chunk sees its own future."""
    if 1 < q.shape[-2] < k.shape[-2]:
        kw.pop("is_causal", None)
        return sdpa(q, k, v, attn_mask=None, is_causal=False, **kw)
    return sdpa(q, k, v, attn_mask=attn_mask, **kw)


def _cache_shared_across_rows(sdpa: Any, q: Any, k: Any, v: Any, *args: Any, **kw: Any) -> Any:
    """Cached steps read row 0's keys and values for every row of the batch."""
    if q.shape[-2] < k.shape[-2]:
        k, v = k[:1].expand_as(k), v[:1].expand_as(v)
    return sdpa(q, k, v, *args, **kw)


def _nan_for_empty_rows(sdpa: Any, q: Any, k: Any, v: Any, attn_mask: Any = None, **kw: Any) -> Any:
    """Queries with every key masked come out NaN (softmax over nothing), as old kernels did."""
    out = sdpa(q, k, v, attn_mask=attn_mask, **kw)
    if attn_mask is None or attn_mask.dim() != 4:
        return out
    allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > torch.finfo(attn_mask.dtype).min
    empty = ~allowed.any(-1, keepdim=True)  # [B, 1|H, q, 1]
    return out.masked_fill(empty.expand_as(out[..., :1]), float("nan"))


def _patched(wrapper: Callable[..., Any]) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    return lambda: _patched_sdpa(wrapper)


def _first_layer(model: Any) -> Any:
    layers = layer_list(model)
    if layers is None:
        raise LookupError(f"no layer list found in {type(model).__name__}")
    return layers[0]


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


def _again(fault: Fault, caught_by: str, padding: str, message: str, description: str) -> Fault:
    """The same planted variant, listed again for a second check that must catch it too."""
    return replace(fault, caught_by=caught_by, padding=padding, message=message,
                   description=description)


_BY_ID = {fault.variant.id: fault for fault in FAULTS}
PROPERTY_FAULTS: list[Fault] = [
    _again(_BY_ID["fault_mask_ignored_left"], "padding_invariance", "", "left-padded batch vs each",
           "attention ignores the padding mask, only for left-padded batches"),
    # the localization between the two runs names the planted layer (its output: the hook's)
    _again(_BY_ID["fault_rows_mix"], "batch_invariance", "",
           "first divergence between the two runs: layer 0 the layer output",
           "rows of a batch leak into each other"),
    _again(_BY_ID["fault_nondeterministic"], "determinism", "",
           "first divergence between the two runs: layer 0 the layer output",
           "output carries run-to-run noise"),
    Fault(_fault("sdpa", "fault_ones_mask_not_causal", post_load=_ones_mask_not_causal),
          "sdpa", "llama", "fp32", "", "mask_equivalence", "no attention mask vs an all-ones mask",
          "an all-ones 2D mask is expanded to 4D without its causal part"),
    Fault(_fault("sdpa", "fault_packing_lost", post_load=_packing_lost),
          "sdpa", "qwen2", "fp32", "", "packed_equivalence", "packed rows",
          "packed rows lose their boundaries (restarting position ids renumbered)"),
    Fault(_fault("sdpa", "fault_cached_step_not_causal", context=_patched(_cached_step_not_causal)),
          "sdpa", "llama", "fp32", "dynamic", "cache_consistency", "cache decoding in chunks",
          "a cached step with several new tokens drops the causal mask"),
    Fault(_fault("sdpa", "fault_cache_shared_rows", context=_patched(_cache_shared_across_rows)),
          "sdpa", "mistral", "fp32", "static", "cache_consistency", "cache decoding in chunks",
          "cached steps read row 0's keys and values for every row"),
    Fault(_fault("sdpa", "fault_empty_row_nan", context=_patched(_nan_for_empty_rows)),
          "sdpa", "gpt_neox", "fp32", "", "fully_padded_and_tiny", "non-finite output in rows",
          "a fully padded row comes out NaN where the reference is finite"),
    Fault(_fault("sdpa", "fault_cache_positions_stale", post_load=_cache_positions_stale),
          "sdpa", "tiny-llama-trained", "fp32", "", "generation", "where the golden run (eager float64",
          "cached decoding steps get position ids one behind"),
]
FAULTS += PROPERTY_FAULTS

# C02: a FlashAttention-2 request that transformers silently serves with SDPA. Not a Fault row: the
# refusal check runs every FA2 spelling of the registry inside one eager-parametrized case.
FA2_SERVED_BY_SDPA = _fault("fa2", "fault_fa2_served_by_sdpa", load_kwargs=REGISTRY["sdpa"].load_kwargs)


def register() -> None:
    """Add the faults to the registry (idempotent)."""
    for fault in FAULTS:
        REGISTRY[fault.variant.id] = fault.variant
    REGISTRY[FA2_SERVED_BY_SDPA.id] = FA2_SERVED_BY_SDPA


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Only a run that loads this catalogue as a plugin (``-p faults``) sees the faults: importing
    the module (the self-tests do, to parametrize) leaves the suite's registry alone."""
    register()
