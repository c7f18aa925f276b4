"""Planted faults in transformers' own integration code, where real bugs live: the mask builders,
cache layers, option handling and generate's input preparation that several paths share.

Unlike the catalogue in faults.py (a wrong variant beside healthy ones), each of these patches the
library for the whole process, as a buggy release would: every model loaded with the affected
implementation has it, the golden run included if the golden run went through that code. A run
plants one with ``-p faults_integration --planted-integration-fault NAME``; the self-tests
(test_integration_faults.py) run the named check with and without it.

The targets are transformers 5.x's (masking_utils, cache_utils, generation.utils); on a release
without a target the fault says so and the self-test skips with that reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass(frozen=True)
class IntegrationFault:
    name: str
    model: str
    variant: str  # the path that shows the fault (the healthy run of it must pass)
    dtype: str
    check: str  # the check (test function without "test_") that must catch it
    selection: str  # -k fragment beside the check (padding / cache kind), "" for any
    message: str  # a fragment the failure message must contain
    description: str


def _masking() -> Any:
    from transformers import masking_utils

    return masking_utils


def _interface_patch(impl: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace the mask builder transformers dispatches to for one attention implementation."""
    interface = _masking().ALL_MASK_ATTENTION_FUNCTIONS
    interface._global_mapping[impl] = wrap(interface._global_mapping[impl])


def _sliding_window_dropped_sdpa() -> None:
    """SDPA's sliding-window mask built as a plain causal one (the window's feature dropped for one
    implementation; eager keeps it)."""
    masking = _masking()
    original = masking.create_sliding_window_causal_mask

    @functools.wraps(original)
    def create(config: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(config, "_attn_implementation", None) == "sdpa":
            return masking.create_causal_mask(config, *args, **kwargs)
        return original(config, *args, **kwargs)

    masking.create_sliding_window_causal_mask = create
    _rebind_in_models("create_sliding_window_causal_mask", create)


ZOO_ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox", "opt", "falcon", "bert",
                     "roberta", "distilbert", "t5", "bart")


def _rebind_in_models(name: str, function: Callable[..., Any]) -> None:
    """Models import mask builders by name at import time: import the zoo's modeling modules now
    and rebind the name in every one that has it."""
    import importlib
    import sys

    for arch in ZOO_ARCHITECTURES:
        importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("transformers.models.") and \
                hasattr(module, name):
            setattr(module, name, function)


def _sdpa_skips_padding_mask() -> None:
    """SDPA decides it may skip the mask and rely on is_causal even when rows are padded (the
    classic skip-the-mask bug): padded rows then attend their pad tokens."""
    masking = _masking()
    original = masking._ignore_causal_mask_sdpa

    @functools.wraps(original)
    def ignore(padding_mask: Any, q_length: int, kv_length: int, q_offset: Any, kv_offset: Any,
               local_attention_size: Any = None) -> bool:
        if local_attention_size is not None and kv_length >= local_attention_size:
            return False
        return q_length == kv_length or q_length == 1

    masking._ignore_causal_mask_sdpa = ignore


def _bidirectional_padding_dropped_sdpa() -> None:
    """Encoders under SDPA: the bidirectional mask builder drops the padding mask."""
    masking = _masking()
    original = masking.create_bidirectional_mask

    @functools.wraps(original)
    def create(config: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(config, "_attn_implementation", None) == "sdpa":
            kwargs["attention_mask"] = None
        return original(config, *args, **kwargs)

    masking.create_bidirectional_mask = create
    _rebind_in_models("create_bidirectional_mask", create)


def _cross_attention_padding_dropped_sdpa() -> None:
    """Encoder-decoders under SDPA: the cross-attention mask (the bidirectional builder called with
    the encoder's states) drops the encoder's padding, so decoder queries read padded encoder
    positions; the encoder's own self-attention keeps its mask."""
    masking = _masking()
    original = masking.create_bidirectional_mask

    @functools.wraps(original)
    def create(config: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(config, "_attn_implementation", None) == "sdpa" \
                and kwargs.get("encoder_hidden_states") is not None:
            kwargs["attention_mask"] = None
        return original(config, *args, **kwargs)

    masking.create_bidirectional_mask = create
    _rebind_in_models("create_bidirectional_mask", create)


def _cached_chunk_causal_dropped() -> None:
    """A cached step with several new tokens gets only the padding part of its mask."""
    def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(builder)
        def sdpa_mask(*args: Any, **kwargs: Any) -> Any:
            q_length = kwargs.get("q_length", args[1] if len(args) > 1 else 0)
            q_offset = kwargs.get("q_offset", args[3] if len(args) > 3 else 0)
            if q_length > 1 and int(q_offset) > 0:
                kwargs["mask_function"] = _masking().bidirectional_mask_function
                kwargs["allow_is_causal_skip"] = False
            return builder(*args, **kwargs)
        return sdpa_mask

    _interface_patch("sdpa", wrap)


def _fully_masked_repair_wrong_axis() -> None:
    """SDPA's repair of fully masked rows (older torch kernels return NaN for them) applied along
    the wrong axis: key columns that no query may see (a left-padded row's pad tokens) are opened
    to every query, real tokens included."""
    def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(builder)
        def sdpa_mask(*args: Any, **kwargs: Any) -> Any:
            import torch

            kwargs["allow_torch_fix"] = False
            mask = builder(*args, **kwargs)
            if mask is None or mask.dtype != torch.bool or mask.dim() != 4:
                return mask
            return mask | torch.all(~mask, dim=-2, keepdim=True)
        return sdpa_mask

    _interface_patch("sdpa", wrap)


def _static_cache_wrong_slot() -> None:
    """Static cache layers write a cached step one slot too far: the true slot stays empty (zeros,
    unmasked) and the new token's own key lands where its causal mask hides it."""
    from transformers import cache_utils

    original = cache_utils.StaticLayer.update

    @functools.wraps(original)
    def update(self: Any, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> Any:
        shift = self.is_initialized and int(self.cumulative_length) > 0 and \
            int(self.cumulative_length) + 1 + key_states.shape[-2] <= self.keys.shape[-2]
        if shift:
            self.cumulative_length.add_(1)
        out = original(self, key_states, value_states, *args, **kwargs)
        if shift:  # the length stays right; only the slot written was wrong
            self.cumulative_length.sub_(1)
        return out

    cache_utils.StaticLayer.update = update


def _cross_attention_cache_stale_layer() -> None:
    """An encoder-decoder's cross-attention cache, once every layer holds its keys and values,
    hands each layer the entry of the layer before it: the prefill is right (each layer computes
    its own), every cached step reads another layer's stale cross-attention keys and values."""
    from transformers import cache_utils

    class StaleAfterPrefill(list):
        def __init__(self, items: Any, owner: Any) -> None:
            super().__init__(items)
            self.owner = owner

        def __getitem__(self, index: Any) -> Any:
            if isinstance(index, int) and index > 0 and len(self) > 1 \
                    and all(self.owner.is_updated.get(i) for i in range(len(self))):
                index -= 1
            return super().__getitem__(index)

    original = cache_utils.EncoderDecoderCache.__init__

    @functools.wraps(original)
    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        cross = self.cross_attention_cache
        cross.layers = StaleAfterPrefill(cross.layers, self)

    cache_utils.EncoderDecoderCache.__init__ = init


def _decoder_positions_shifted() -> None:
    """An encoder-decoder's cache reports one token more than it holds once it holds any: the
    decoder's absolute positions (BART's, from the cache length) shift by one on every cached
    step; a forward without a cache, or its prefill, is right."""
    from transformers import cache_utils

    original = cache_utils.EncoderDecoderCache.get_seq_length

    @functools.wraps(original)
    def get_seq_length(self: Any, *args: Any, **kwargs: Any) -> int:
        held = original(self, *args, **kwargs)
        return held + 1 if held else held

    cache_utils.EncoderDecoderCache.get_seq_length = get_seq_length


def _generate_positions_stuck() -> None:
    """generate's per-step input update repeats the last position instead of advancing it: every
    decoding step after the first sees a stale RoPE position."""
    from transformers.generation import utils

    original = utils.GenerationMixin._update_model_kwargs_for_generation

    @functools.wraps(original)
    def update(self: Any, outputs: Any, model_kwargs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        before = model_kwargs.get("position_ids")
        out = original(self, outputs, model_kwargs, *args, **kwargs)
        after = out.get("position_ids")
        if before is not None and after is not None and after.shape[-1] > before.shape[-1]:
            after[..., before.shape[-1]:] -= 1
        return out

    utils.GenerationMixin._update_model_kwargs_for_generation = update


def _eager_mask_drops_padding() -> None:
    """The eager mask builder drops the padding mask: the plain path itself is wrong on padded
    batches (the REF row must fail; the golden run, each row alone, has no padding to drop)."""
    def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(builder)
        def eager_mask(*args: Any, **kwargs: Any) -> Any:
            kwargs["attention_mask"] = None
            return builder(*args, **kwargs)
        return eager_mask

    _interface_patch("eager", wrap)


def _sdpa_unmasked_not_causal() -> None:
    """SDPA models called without an attention_mask get a non-causal mask (falcon-alibi's 2024 bug,
    here in the shared mask builder): an all-ones mask hides it, no mask shows it."""
    import torch

    masking = _masking()
    original = masking.create_causal_mask

    @functools.wraps(original)
    def create(config: Any, *args: Any, **kwargs: Any) -> Any:
        embeds = kwargs.get("inputs_embeds", args[0] if args else None)
        if getattr(config, "_attn_implementation", None) == "sdpa" and \
                kwargs.get("attention_mask") is None and embeds is not None and embeds.shape[1] > 1:
            batch, length = embeds.shape[:2]
            return torch.ones(batch, 1, length, length, dtype=torch.bool, device=embeds.device)
        return original(config, *args, **kwargs)

    masking.create_causal_mask = create
    _rebind_in_models("create_causal_mask", create)


def _experts_kernel_next_expert() -> None:
    """The experts kernel every mixture of experts dispatches to by default (5.x's grouped_mm)
    sends each token to the expert after the one its router chose: the plain path (eager
    attention) has it too, the golden run's eager expert loops do not."""
    from transformers.integrations import moe

    mapping = moe.ALL_EXPERTS_FUNCTIONS._global_mapping
    original = mapping["grouped_mm"]

    @functools.wraps(original)
    def shifted(self: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
        return original(self, hidden_states, (top_k_index + 1) % self.num_experts, top_k_weights)

    mapping["grouped_mm"] = shifted


def _whisper_positions_restart() -> None:
    """Whisper's decoder positions (a learned table indexed from the cache's length) restart at 0
    on every cached step: a forward without a cache, or its prefill, is right."""
    from transformers.models.whisper import modeling_whisper

    table = modeling_whisper.WhisperPositionalEmbedding
    original = table.forward

    @functools.wraps(original)
    def forward(self: Any, input_ids: Any, *args: Any, **kwargs: Any) -> Any:
        positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if positions is None:
            return self.weight[: input_ids.shape[1]]
        return self.weight[positions - positions[..., :1]]  # each chunk counted from its start

    table.forward = forward


PLANT: dict[str, Callable[[], None]] = {
    "sliding_window_dropped_sdpa": _sliding_window_dropped_sdpa,
    "sdpa_skips_padding_mask": _sdpa_skips_padding_mask,
    "bidirectional_padding_dropped_sdpa": _bidirectional_padding_dropped_sdpa,
    "cross_attention_padding_dropped_sdpa": _cross_attention_padding_dropped_sdpa,
    "cached_chunk_causal_dropped": _cached_chunk_causal_dropped,
    "fully_masked_repair_wrong_axis": _fully_masked_repair_wrong_axis,
    "static_cache_wrong_slot": _static_cache_wrong_slot,
    # the same shared cache layer, under an encoder-decoder's EncoderDecoderCache of StaticCaches
    "static_cache_wrong_slot_seq2seq": _static_cache_wrong_slot,
    "generate_positions_stuck": _generate_positions_stuck,
    "cross_attention_cache_stale_layer": _cross_attention_cache_stale_layer,
    "decoder_positions_shifted": _decoder_positions_shifted,
    "eager_mask_drops_padding": _eager_mask_drops_padding,
    "sdpa_unmasked_not_causal": _sdpa_unmasked_not_causal,
    "experts_kernel_next_expert": _experts_kernel_next_expert,
    "whisper_positions_restart": _whisper_positions_restart,
}

FAULTS: list[IntegrationFault] = [
    IntegrationFault("sliding_window_dropped_sdpa", "mistral", "sdpa", "fp32", "logits", "nopad",
                     "max|variant - golden|",
                     "SDPA's sliding-window mask built as plain causal (eager keeps the window)"),
    IntegrationFault("sdpa_skips_padding_mask", "llama", "sdpa", "fp32", "logits", "pad_left",
                     "max|variant - golden|",
                     "SDPA skips a padded batch's mask and relies on is_causal"),
    IntegrationFault("bidirectional_padding_dropped_sdpa", "bert", "sdpa", "fp32", "logits",
                     "pad_right", "max|variant - golden|",
                     "encoders under SDPA lose their padding mask"),
    IntegrationFault("cross_attention_padding_dropped_sdpa", "bart", "sdpa", "fp32", "logits",
                     "pad_right", "max|variant - golden|",
                     "encoder-decoders under SDPA: cross-attention ignores the encoder's padding mask"),
    IntegrationFault("cached_chunk_causal_dropped", "llama", "sdpa", "fp32", "cache_consistency",
                     "dynamic", "cache decoding in chunks",
                     "a multi-token cached step gets no causal part"),
    IntegrationFault("fully_masked_repair_wrong_axis", "llama", "sdpa", "fp32", "logits", "pad_left",
                     "max|variant - golden|",
                     "the repair of fully masked rows opens fully masked key columns instead"),
    IntegrationFault("static_cache_wrong_slot", "llama", "sdpa", "fp32", "cache_consistency",
                     "static", "cache decoding in chunks",
                     "static cache writes a cached step one slot too far"),
    IntegrationFault("generate_positions_stuck", "tiny-llama-trained", "sdpa", "fp32", "generation",
                     "", "where the golden run (eager float64",
                     "generate repeats the last position id instead of advancing it"),
    IntegrationFault("cross_attention_cache_stale_layer", "t5", "eager", "fp32", "cache_consistency",
                     "dynamic", "cache decoding in chunks",
                     "encoder-decoder cache: cached steps read another layer's stale cross-attention "
                     "keys and values"),
    IntegrationFault("static_cache_wrong_slot_seq2seq", "t5", "eager", "fp32", "cache_consistency",
                     "static", "cache decoding in chunks",
                     "encoder-decoder static cache: the decoder's cached step written one slot too far"),
    IntegrationFault("decoder_positions_shifted", "bart", "sdpa", "fp32", "cache_consistency",
                     "dynamic", "cache decoding in chunks",
                     "encoder-decoder cache reports one token too many: decoder positions shift by "
                     "one on cached steps"),
    IntegrationFault("whisper_positions_restart", "whisper", "sdpa", "fp32", "cache_consistency",
                     "dynamic", "cache decoding in chunks",
                     "Whisper's decoder positions restart at 0 on every cached step (its learned "
                     "position table read from 0, not from the cache's length)"),
    IntegrationFault("eager_mask_drops_padding", "llama", "eager", "fp32", "logits", "pad_left",
                     "REF failure",
                     "the eager mask builder drops the padding mask (the plain path is wrong)"),
    IntegrationFault("sdpa_unmasked_not_causal", "llama", "sdpa", "fp32", "mask_equivalence", "",
                     "no attention mask vs an all-ones mask",
                     "SDPA without an attention mask runs non-causal"),
    IntegrationFault("experts_kernel_next_expert", "mixtral", "sdpa", "fp32", "logits", "nopad",
                     "max|variant - golden|",
                     "the default experts kernel routes every token to the next expert (the plain "
                     "path shares it; the routing near-tie rule must not hide it)"),
]


# faults whose target is a model's own module, in every release of the range (not masking_utils)
OWN_TARGETS = frozenset({"whisper_positions_restart"})


def unavailable(name: str) -> str | None:
    """Why this transformers has no target for the fault, or None."""
    import importlib.util

    if name in OWN_TARGETS:
        return None
    if importlib.util.find_spec("transformers.masking_utils") is None:  # asked without importing
        return "its target, transformers.masking_utils, is transformers >= 4.53 only"
    if name == "experts_kernel_next_expert" and importlib.util.find_spec(
            "transformers.integrations.moe") is None:
        return "its target, transformers.integrations.moe (experts kernels), is transformers 5.x only"
    return None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--planted-integration-fault", default=None, metavar="NAME",
                     help="self-tests only: plant one fault in transformers' integration code")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("planted_integration_fault")
    if name:
        PLANT[name]()
