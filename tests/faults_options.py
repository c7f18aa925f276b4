"""Planted faults in the ways users call a model (conformance/options.py), each in one layer.

Each patches the library or the model class for the whole process, as a buggy release would,
and sits in layer 1's attention (the zoo's decoders have two layers), so that the localization
must name layer 1, with layer 0 clean. A run plants one with ``-p faults_options
--planted-option-fault NAME``; tests/test_option_faults.py runs the named check with and without
it, drawing only the option the fault sits in (``--option``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

LAYER = 1


@dataclass(frozen=True)
class OptionFault:
    name: str
    model: str
    variant: str
    dtype: str
    check: str  # the check that must catch it
    option: str  # the option it sits in (test_options draws only this one)
    message: str  # a fragment the failure must contain
    layer: int | None  # the layer the localization must name (None: no layer, e.g. the loss)
    description: str


def _attention_of(module: Any) -> Any:
    for name in ("self_attn", "attn", "attention", "self_attention"):
        if hasattr(module, name):
            return getattr(module, name)
    raise LookupError(f"no attention in {type(module).__name__}")


def _layer_attention_class(model_class: Any) -> Any:
    """The attention class the model's layers use (patched on the class: every model loaded)."""
    import importlib

    module = importlib.import_module(model_class.__module__)
    for name in dir(module):
        if name.endswith("Attention") and isinstance(getattr(module, name), type):
            return getattr(module, name)
    raise LookupError(f"no attention class in {module.__name__}")


def _patch_forward(cls: Any, edit: Any) -> None:
    """Wrap cls.forward; `edit(module, args, kwargs)` returns new (args, kwargs) for layer 1."""
    original = cls.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "layer_idx", None) == LAYER:
            args, kwargs = edit(self, args, kwargs)
        return original(self, *args, **kwargs)

    cls.forward = forward


def _llama_attention() -> Any:
    from transformers.models.llama import modeling_llama

    return modeling_llama.LlamaAttention


def _mask_dropped_with_weights() -> None:
    """Layer 1 ignores the attention mask whenever attention weights are asked for."""
    def edit(module: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if kwargs.get("output_attentions"):
            kwargs = {**kwargs, "attention_mask": None}
            module.is_causal = False
        else:
            module.is_causal = True
        return args, kwargs

    _patch_forward(_llama_attention(), edit)


def _past_length(kwargs: dict[str, Any]) -> int:
    cache = kwargs.get("past_key_values", kwargs.get("past_key_value", kwargs.get("cache")))
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


_CALLED_WITHOUT_MASK: dict[str, bool] = {"now": False}


def _unmasked_cached_chunk() -> None:
    """A cached step of several tokens called without an attention_mask takes an unmasked branch
    in layer 1 (no causal mask within the new chunk); with a mask, or one token, it is fine."""
    import transformers

    model_class = transformers.LlamaModel
    original = model_class.forward

    def model_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        _CALLED_WITHOUT_MASK["now"] = kwargs.get("attention_mask") is None
        return original(self, *args, **kwargs)

    model_class.forward = model_forward

    def edit(module: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        hidden = args[0] if args else kwargs.get("hidden_states")
        branch = _CALLED_WITHOUT_MASK["now"] and hidden.shape[1] > 1 and _past_length(kwargs) > 0
        module.is_causal = not branch
        if branch:
            kwargs = {**kwargs, "attention_mask": None}
        return args, kwargs

    _patch_forward(_llama_attention(), edit)


def _legacy_layout_swapped() -> None:
    """Reading the legacy tuple cache, layer 1's keys and values swap places."""
    from transformers import DynamicCache

    original = DynamicCache.from_legacy_cache.__func__

    def from_legacy_cache(cls: Any, past_key_values: Any = None, *args: Any, **kwargs: Any) -> Any:
        if past_key_values is not None and len(past_key_values) > LAYER:
            layers = list(past_key_values)
            key, value = layers[LAYER][0], layers[LAYER][1]
            layers[LAYER] = (value, key, *layers[LAYER][2:])
            past_key_values = tuple(layers)
        return original(cls, past_key_values, *args, **kwargs)

    DynamicCache.from_legacy_cache = classmethod(from_legacy_cache)


def _loss_labels_shifted() -> None:
    """The causal-LM loss shifts labels by two positions instead of one."""
    from transformers.loss import loss_utils

    original = loss_utils.ForCausalLMLoss

    def shifted(logits: Any, labels: Any, *args: Any, **kwargs: Any) -> Any:
        import torch

        labels = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=-100)
        return original(logits, labels, *args, **kwargs)

    loss_utils.ForCausalLMLoss = shifted
    for key, value in list(loss_utils.LOSS_MAPPING.items()):
        if value is original:
            loss_utils.LOSS_MAPPING[key] = shifted


def _embeds_drop_encoder_mask() -> None:
    """T5's encoder given inputs_embeds (no input_ids) drops the attention mask, as a mask builder
    keyed on input_ids would: its real tokens attend to the pads."""
    from transformers.models.t5 import modeling_t5

    stack = modeling_t5.T5Stack
    original = stack.forward

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        embeds_only = kwargs.get("inputs_embeds") is not None and kwargs.get("input_ids") is None
        if not self.is_decoder and embeds_only:
            kwargs = {**kwargs, "attention_mask": None}
        return original(self, *args, **kwargs)

    stack.forward = forward


FAULTS = [
    OptionFault("mask_dropped_with_weights", "llama", "eager", "fp32", "output_attentions",
                "output_attentions", "option output_attentions vs the plain call", LAYER,
                "layer 1 ignores the attention mask whenever attention weights are asked for"),
    OptionFault("unmasked_cached_chunk", "llama", "sdpa", "fp32", "options", "mask_none_cached",
                "option mask_none_cached (chunks", LAYER,
                "a cached multi-token step without a mask takes an unmasked branch in layer 1"),
    OptionFault("legacy_layout_swapped", "gpt_neox", "sdpa", "fp32", "options", "cache_legacy_tuple",
                "option cache_legacy_tuple (chunks", LAYER,
                "the legacy tuple cache is read with layer 1's keys and values swapped"),
    OptionFault("loss_labels_shifted", "llama", "sdpa", "fp32", "options", "labels",
                "is not the cross-entropy of the returned logits", None,
                "the causal-LM loss is computed on labels shifted by two"),
    OptionFault("embeds_drop_encoder_mask", "t5", "eager", "fp32", "options", "inputs_embeds",
                "option inputs_embeds vs the plain call", None,
                "an encoder-decoder's encoder given inputs_embeds drops the attention mask"),
]
PLANT = {"mask_dropped_with_weights": _mask_dropped_with_weights,
         "unmasked_cached_chunk": _unmasked_cached_chunk,
         "legacy_layout_swapped": _legacy_layout_swapped,
         "loss_labels_shifted": _loss_labels_shifted,
         "embeds_drop_encoder_mask": _embeds_drop_encoder_mask}


def unavailable(name: str) -> str | None:
    """Why a fault cannot be planted on this stack (its target does not exist), else None."""
    from importlib.metadata import version

    major = int(version("transformers").split(".")[0])
    if name == "legacy_layout_swapped" and major >= 5:
        return "transformers 5 has no legacy tuple cache to read"
    if name == "loss_labels_shifted":
        try:
            from transformers.loss import loss_utils  # noqa: F401
        except ImportError:
            return "this transformers has no transformers.loss"
    return None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--planted-option-fault", default=None, choices=sorted(PLANT))


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("planted_option_fault")
    if name:
        PLANT[name]()
