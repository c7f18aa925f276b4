"""Decoder (and encoder-decoder) runs beyond one forward: cached incremental decoding, packed
inputs, greedy generate.

Each returns float64 CPU tensors laid out like a plain forward over the same padded batch, so
the properties compare them position by position on real tokens.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

from conformance.running import Loaded
from conformance.timing import forward_phase

CACHE_KINDS = ("dynamic", "static")


def static_cache_reason(loaded: Loaded) -> str | None:
    """Why this model cannot take a static cache here, or None."""
    model = loaded.model
    supported = getattr(model, "_supports_static_cache", None)  # transformers < 4.50 spelling
    if supported is None and callable(getattr(model, "_setup_cache", None)):
        supported = True  # transformers 4.38 .. 4.40: generate's own test for a static cache
    if supported is None:
        supported = getattr(model, "_can_compile_fullgraph", False)
    if not supported:
        return f"{type(model).__name__} does not support a static KV cache on this transformers"
    return None


def _static_cache(loaded: Loaded, batch: int, max_len: int) -> Any:
    from transformers import StaticCache

    params = _init_params(StaticCache)
    first = next(loaded.model.parameters())
    if "batch_size" in params:  # transformers 4.x: sized and placed up front
        return StaticCache(config=loaded.model.config, batch_size=batch, max_cache_len=max_len,
                           device=first.device, dtype=first.dtype)
    if "max_batch_size" in params:  # transformers 4.38 .. 4.44: the batch is max_batch_size
        return StaticCache(config=loaded.model.config, max_batch_size=batch, max_cache_len=max_len,
                           device=first.device, dtype=first.dtype)
    return StaticCache(config=loaded.model.config, max_cache_len=max_len)


def _encoder_length(loaded: Loaded, encoder_inputs: dict[str, Any]) -> int:
    """How many positions the encoder's output has: its input's, or a speech encoder's
    fixed count (`zoo.speech_encoder_positions`)."""
    from conformance.zoo import speech_encoder_positions

    if "input_ids" in encoder_inputs:
        return int(encoder_inputs["input_ids"].shape[1])
    return speech_encoder_positions(loaded.model.config)


def _static_encoder_decoder_cache(loaded: Loaded, batch: int, decoder_len: int, encoder_len: int) -> Any:
    """The cache generate builds for an encoder-decoder asked for cache_implementation="static":
    the decoder's self-attention and the cross-attention each in a StaticCache of its own."""
    from transformers import EncoderDecoderCache

    return EncoderDecoderCache(_static_cache(loaded, batch, decoder_len),
                               _static_cache(loaded, batch, encoder_len))


def _init_params(cls: type) -> Any:
    """The named parameters a class's constructor takes: transformers 4.54-4.56's StaticCache
    takes (*args, **kwargs) and hands them to Cache.__init__, whose names say the spelling."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    for klass in cls.__mro__:
        params = inspect.signature(klass.__init__).parameters
        if any(p.kind not in variadic for name, p in params.items() if name != "self"):
            return params
    return inspect.signature(cls.__init__).parameters


def incremental(loaded: Loaded, input_ids: Any, mask: Any, chunks: list[int], cache_kind: str) -> Any:
    """Logits of decoding `input_ids` chunk by chunk through the KV cache, as [B, W, V] float64.

    The first chunk is the prefill; later chunks may hold several tokens (a cached step with
    more than one query is where a dropped causal mask shows) or one (ordinary decoding).
    """
    import torch

    assert sum(chunks) == input_ids.shape[1], (chunks, input_ids.shape)
    if loaded.zoo.kind == "seq2seq":
        return _incremental_seq2seq(loaded, input_ids, mask, chunks, cache_kind)
    device = loaded.device
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = _static_cache(loaded, input_ids.shape[0], input_ids.shape[1]) \
        if cache_kind == "static" else None
    outs, start = [], 0
    with forward_phase(loaded), torch.inference_mode(), loaded.variant.context():
        for size in chunks:
            end = start + size
            inputs: dict[str, Any] = {
                "input_ids": input_ids[:, start:end], "attention_mask": mask[:, :end],
                "past_key_values": cache, "use_cache": True,
            }
            if loaded.accepts_position_ids:
                inputs["position_ids"] = positions[:, start:end]
            if cache_kind == "static":
                inputs["cache_position"] = torch.arange(start, end, device=device)
            out = loaded.model(**inputs)
            cache = out.past_key_values
            outs.append(out.logits.detach().to("cpu", torch.float64))
            start = end
    return torch.cat(outs, dim=1)


def _incremental_seq2seq(loaded: Loaded, input_ids: Any, mask: Any, chunks: list[int],
                         cache_kind: str = "dynamic") -> Any:
    """An encoder-decoder decoded as generate does: the encoder once, at the prefill; every later
    chunk gets its states back (`encoder_outputs`) and the cache, which holds the decoder's
    self-attention keys and values and the cross-attention ones computed at the prefill
    (EncoderDecoderCache: the model's own dynamic one, or, for `static`, one of two StaticCaches
    as generate builds it, the decoder's sized to the batch's width and the cross-attention's
    to the encoder's output, with each chunk's cache_position). The decoder's tokens and mask
    are `running.with_decoder_inputs`'."""
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    from conformance.running import with_decoder_inputs

    device = loaded.device
    input_ids, mask = input_ids.to(device), mask.to(device)
    both = with_decoder_inputs(loaded, {"input_ids": input_ids, "attention_mask": mask})
    decoder_ids, decoder_mask = both.pop("decoder_input_ids"), both.pop("decoder_attention_mask")
    encoder_inputs = both  # token ids and mask, or a speech encoder's features
    cache: Any = None
    positions = cache_kind == "static" and \
        "cache_position" in inspect.signature(loaded.model.forward).parameters
    if cache_kind == "static":
        cache = _static_encoder_decoder_cache(loaded, decoder_ids.shape[0], decoder_ids.shape[1],
                                              _encoder_length(loaded, encoder_inputs))
    encoder: Any = None
    outs, start = [], 0
    with forward_phase(loaded), torch.inference_mode(), loaded.variant.context():
        for size in chunks:
            end = start + size
            inputs: dict[str, Any] = {
                "decoder_input_ids": decoder_ids[:, start:end],
                "decoder_attention_mask": decoder_mask[:, :end], "use_cache": True,
            }
            if positions:
                inputs["cache_position"] = torch.arange(start, end, device=device)
            if encoder is None:
                inputs.update(encoder_inputs)
                if cache is not None:
                    inputs["past_key_values"] = cache
            else:
                inputs.update(encoder_outputs=BaseModelOutput(last_hidden_state=encoder),
                              past_key_values=cache)
                if "attention_mask" in encoder_inputs:
                    inputs["attention_mask"] = encoder_inputs["attention_mask"]
            out = loaded.model(**inputs)
            if encoder is None:
                encoder = getattr(out, "encoder_last_hidden_state", None)
            if encoder is None:  # an output without the encoder's states (ONNX Runtime's): as generate does
                encoder = loaded.model.get_encoder()(**encoder_inputs).last_hidden_state
            cache = out.past_key_values
            outs.append(out.logits.detach().to("cpu", torch.float64))
            start = end
    return torch.cat(outs, dim=1)


def in_form(loaded: Loaded, input_ids: Any, mask: Any, chunks: list[int], pass_mask: bool = True,
            explicit_cache: bool = False, legacy: bool = False) -> Any:
    """Cached decoding in chunks, in one of the forms users call it (conformance/options.py): with
    or without an attention_mask at each step, the model's own cache or a DynamicCache passed at
    prefill, the cache handed back as a Cache or (transformers 4.x) as the legacy tuple. Logits
    as [B, W, V] float64 on CPU."""
    import torch

    assert sum(chunks) == input_ids.shape[1], (chunks, input_ids.shape)
    device = loaded.device
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache: Any = None
    if explicit_cache:
        from transformers import DynamicCache

        cache = DynamicCache()
    outs, start = [], 0
    with forward_phase(loaded), torch.inference_mode(), loaded.variant.context():
        for size in chunks:
            end = start + size
            inputs: dict[str, Any] = {"input_ids": input_ids[:, start:end], "use_cache": True}
            if cache is not None:
                inputs["past_key_values"] = cache
            if pass_mask:
                inputs["attention_mask"] = mask[:, :end]
            if loaded.accepts_position_ids:
                inputs["position_ids"] = positions[:, start:end]
            out = loaded.model(**inputs)
            cache = out.past_key_values
            if legacy and hasattr(cache, "to_legacy_cache"):
                cache = cache.to_legacy_cache()
            outs.append(out.logits.detach().to("cpu", torch.float64))
            start = end
    return torch.cat(outs, dim=1)


def full_with_cache_off(loaded: Loaded, input_ids: Any, mask: Any) -> Any:
    """The same tokens in one forward, no cache: what every cached decoding must reproduce."""
    import torch

    from conformance.running import plain_inputs, with_decoder_inputs

    inputs = plain_inputs(loaded, input_ids, mask)
    if loaded.zoo.kind == "seq2seq":
        inputs = with_decoder_inputs(loaded, inputs)
    with forward_phase(loaded), torch.inference_mode(), loaded.variant.context():
        out = loaded.model(**inputs, use_cache=False)
    return out.logits.detach().to("cpu", torch.float64)


def packed_reason(loaded: Loaded) -> str | None:
    """Why padding-free (packed) inputs are not supported for this model here, or None.

    transformers detects packed sequences from position_ids that restart (masking_utils,
    transformers >= 4.53), in models that hand their position_ids to the mask builder; whether a
    model does is measured on its eager path (see test_packed_equivalence).
    """
    try:
        from transformers import masking_utils
    except ImportError:
        return ("packed (padding-free) inputs need transformers >= 4.53 (masking_utils): "
                "run on the current stack")
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        return "this transformers does not detect packed sequences from position_ids"
    if not loaded.accepts_position_ids:
        return f"{type(loaded.model).__name__} takes no position_ids: no packed form"
    return None


def packed(loaded: Loaded, rows: list[Any]) -> Any:
    """Rows concatenated into one sequence, positions restarting per row, no mask, no cache;
    returns [N, V] float64, the rows' real tokens in order."""
    import torch

    ids = torch.cat(rows)[None].to(loaded.device)
    positions = torch.cat([torch.arange(len(r)) for r in rows])[None].to(loaded.device)
    with forward_phase(loaded), torch.inference_mode(), loaded.variant.context():
        out = loaded.model(input_ids=ids, position_ids=positions, use_cache=False)
    return out.logits.detach().to("cpu", torch.float64)[0]


def greedy(loaded: Loaded, input_ids: Any, mask: Any, new_tokens: int) -> tuple[Any, Any]:
    """Greedy `generate`: (generated tokens [B, T], per-step logits [B, T, V] float64)."""
    import torch

    kwargs: dict[str, Any] = {
        "max_new_tokens": new_tokens, "do_sample": False, "num_beams": 1,
        "output_logits": True, "return_dict_in_generate": True,
        "pad_token_id": loaded.pad_id,
    }
    with torch.inference_mode(), loaded.variant.context(), _quiet():
        out = loaded.model.generate(input_ids.to(loaded.device), attention_mask=mask.to(loaded.device),
                                    **kwargs)
    # a decoder's sequences carry the prompt; an encoder-decoder's start with the decoder start token
    tokens = out.sequences[:, 1 if loaded.zoo.kind == "seq2seq" else input_ids.shape[1]:].cpu()
    logits = torch.stack([step.detach().to("cpu", torch.float64) for step in out.logits], dim=1)
    return tokens, logits


@contextlib.contextmanager
def _quiet() -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
