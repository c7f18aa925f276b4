"""Forward options and input forms: what users pass must change what is returned, never the answer.

Every check calls a model one way (ids, a mask, positions). Real regressions live in the other
ways: an implementation asked for attention weights that falls back to another path with
another mask; a cached step without a mask taking another branch; a legacy tuple cache read
with another layout. Each record here is one such way, declared with the kinds it applies to,
what it adds to the plain call, whether the plain call's kernels still run (then the answer
must be bitwise the same), and how its extra output is judged. ``test_options`` draws one per
example (conformance/suite/test_properties.py).

Cached forms decode in chunks (a prefill, a multi-token cached step, then single tokens) and
compare with one full forward over the same tokens without a cache (not with the plain cached
decoding: 4.48's gpt_neox hands back legacy tuples itself, so that would judge the form by itself).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from conformance import compare, tolerances
from conformance.running import Loaded

DECODER = frozenset({"decoder"})
ENCODER = frozenset({"encoder"})
BOTH = DECODER | ENCODER
SEQ2SEQ = frozenset({"seq2seq"})  # an encoder-decoder's call: the decoder's logits are its answer


@dataclass(frozen=True)
class Context:
    """What an option's extra judge may use besides its own output."""

    variant: Loaded
    reference: Loaded
    golden: Loaded
    ids: Any
    mask: Any
    padding: str
    dtype: str
    kernel_class: bool  # the variant's tolerance is the kernel one (quantization is not judged per layer)
    per_row: bool = True  # golden is each row alone (conformance.checks.golden_per_row); else padded


@dataclass(frozen=True)
class Option:
    name: str
    summary: str
    kinds: frozenset[str]
    # extra inputs for the plain call (or, for a cached form, its decoding form), or the reason it
    # does not apply here
    inputs: Callable[[Loaded, Any, Any], dict[str, Any] | str]
    same_kernels: bool = True  # the plain call's kernels run: the answer must be bitwise the same
    extra: Callable[[Any, Context], tuple[str | None, dict[str, Any]]] | None = None
    cached: bool = False  # a decoding form (chunks through the KV cache), not one forward
    unpadded: bool = False  # drawn batches are made full-width (a form with no mask at all)


def _accepts(loaded: Loaded, name: str) -> bool:
    try:
        return name in inspect.signature(loaded.model.forward).parameters
    except (TypeError, ValueError):
        return False


def _graph_only(loaded: Loaded) -> str | None:
    """An exported graph (ONNX Runtime) returns its outputs only: no per-layer extras."""
    if type(loaded.model).__module__.startswith("optimum.onnxruntime"):
        return (f"{type(loaded.model).__name__} runs an exported ONNX graph that returns its outputs "
                "only (no per-layer weights or states)")
    return None


def _flag(name: str, value: Any = True, internals: bool = False
          ) -> Callable[[Loaded, Any, Any], dict[str, Any] | str]:
    def inputs(loaded: Loaded, ids: Any, mask: Any) -> dict[str, Any] | str:
        if internals and (reason := _graph_only(loaded)):
            return reason
        if not _accepts(loaded, name) and not _accepts(loaded, "kwargs"):
            return f"{type(loaded.model).__name__}.forward takes no {name}"
        return {name: value}
    return inputs


def _inputs_embeds(loaded: Loaded, ids: Any, mask: Any) -> dict[str, Any] | str:
    import torch

    get = getattr(loaded.model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    if embeddings is None or not _accepts(loaded, "inputs_embeds"):
        return f"{type(loaded.model).__name__} takes no inputs_embeds"
    with torch.inference_mode():
        embeds = embeddings(ids.to(loaded.device))
    extra: dict[str, Any] = {"input_ids": None, "inputs_embeds": embeds}
    config = loaded.model.config
    if config.model_type in POSITIONS_FROM_IDS and not loaded.accepts_position_ids:
        # these models derive positions from input_ids (skipping pads); from inputs_embeds they
        # are documented to be sequential (RobertaEmbeddings): pass the ones the ids give
        pad = int(config.pad_token_id)
        positions = (mask.cumsum(-1) * mask + pad).to(loaded.device)
        extra["position_ids"] = positions
    if loaded.zoo.kind == "seq2seq":  # the decoder keeps the tokens the plain call gives it
        extra.update(_decoder_side(loaded, ids, mask))
    return extra


def _decoder_side(loaded: Loaded, ids: Any, mask: Any) -> dict[str, Any]:
    """An encoder-decoder's decoder inputs as the plain call builds them (`running.with_decoder_inputs`)."""
    from conformance.running import plain_inputs, with_decoder_inputs

    both = with_decoder_inputs(loaded, plain_inputs(loaded, ids, mask))
    return {key: both[key] for key in ("decoder_input_ids", "decoder_attention_mask") if key in both}


def _decoder_inputs_embeds(loaded: Loaded, ids: Any, mask: Any) -> dict[str, Any] | str:
    """The decoder's own embeddings of the tokens the plain call gives it, instead of those ids;
    the encoder's inputs stay as they are (ids, or a speech encoder's features)."""
    import torch

    from conformance.running import plain_inputs, with_decoder_inputs

    if reason := _graph_only(loaded):
        return reason
    get = getattr(loaded.model, "get_decoder", None)
    decoder = get() if callable(get) else None
    embeddings = getattr(decoder, "embed_tokens", None)
    if embeddings is None or not _accepts(loaded, "decoder_inputs_embeds"):
        return f"{type(loaded.model).__name__} takes no decoder_inputs_embeds"
    both = with_decoder_inputs(loaded, plain_inputs(loaded, ids, mask))
    with torch.inference_mode():
        embeds = embeddings(both.pop("decoder_input_ids"))
    # a speech encoder's call carries features, not the ids the plain inputs hold
    return {"input_ids": None, **both, "decoder_inputs_embeds": embeds}


# encoders whose embeddings number positions from input_ids, skipping padding (padding_idx + 1 on)
POSITIONS_FROM_IDS = frozenset({"roberta", "xlm-roberta", "camembert"})



def _token_type_ids(loaded: Loaded, ids: Any, mask: Any) -> dict[str, Any] | str:
    import torch

    if not _accepts(loaded, "token_type_ids"):
        return f"{type(loaded.model).__name__} takes no token_type_ids"
    return {"token_type_ids": torch.zeros_like(ids).to(loaded.device)}


def causal_labels(ids: Any, mask: Any) -> Any:
    """Labels for the loss: real tokens, except each row's first real token (left padding would
    make a pad position predict it) and every pad (-100: ignored)."""
    labels = ids.masked_fill(mask == 0, -100)
    first = (mask.cumsum(-1) == 1) & (mask == 1)
    return labels.masked_fill(first, -100)


def loss_labels(loaded: Loaded, ids: Any, mask: Any) -> tuple[Any, bool]:
    """The labels passed for the loss, and whether the model shifts them by one. A decoder
    predicts each next token (`causal_labels`, shifted). An encoder-decoder given its decoder
    inputs scores each position against the label there, unshifted (it shifts labels only to make
    decoder inputs, and these are given): its labels are its decoder tokens, pads ignored."""
    if loaded.zoo.kind == "seq2seq":
        from conformance.running import decoder_tokens

        decoder = decoder_tokens(loaded, ids.cpu(), mask.cpu())
        return decoder.masked_fill(mask.cpu() == 0, -100), False
    return causal_labels(ids, mask), True


def _labels(loaded: Loaded, ids: Any, mask: Any) -> dict[str, Any] | str:
    if not _accepts(loaded, "labels"):
        return f"{type(loaded.model).__name__} takes no labels"
    labels, _ = loss_labels(loaded, ids, mask)
    return {"labels": labels.to(loaded.device)}


def _cache_position(loaded: Loaded, ids: Any, mask: Any) -> dict[str, Any] | str:
    import torch

    if not _accepts(loaded, "cache_position"):
        return f"{type(loaded.model).__name__}.forward takes no cache_position in this transformers"
    return {"cache_position": torch.arange(ids.shape[1], device=loaded.device)}


def _form(**form: Any) -> Callable[[Loaded, Any, Any], dict[str, Any] | str]:
    def inputs(loaded: Loaded, ids: Any, mask: Any) -> dict[str, Any] | str:
        if form.get("legacy"):
            from conformance.compat import installed_version

            version = installed_version("transformers")
            if version is None or version.major >= 5:
                return "transformers 5 takes Cache objects only (the legacy tuple format is gone)"
            refused = _tuple_refused(loaded)
            if refused:
                return refused
        if form.get("explicit_cache"):
            try:
                from transformers import DynamicCache  # noqa: F401
            except ImportError:
                return "this transformers has no DynamicCache"
            if getattr(loaded.model, "_supports_cache_class", True) is False:
                return (f"{type(loaded.model).__name__} takes the legacy tuple cache only in this "
                        "transformers (_supports_cache_class is False)")
        return dict(form)
    return inputs


def _tuple_refused(loaded: Loaded) -> str | None:
    """Whether this model takes a legacy tuple cache at all, tried on two tokens then one (4.48:
    llama and qwen2 no longer convert tuples; gpt2, opt, gpt_neox and falcon do)."""
    import torch

    ids = torch.tensor([[5, 9, 17]], device=loaded.device)
    try:
        with torch.inference_mode(), loaded.variant.context():
            cache = loaded.model(input_ids=ids[:, :2], use_cache=True).past_key_values
            legacy = cache.to_legacy_cache() if hasattr(cache, "to_legacy_cache") else cache
            loaded.model(input_ids=ids[:, 2:], past_key_values=legacy, use_cache=True)
    except Exception as exc:
        return (f"{type(loaded.model).__name__} does not take the legacy tuple cache in this "
                f"transformers ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    return None


def cross_entropy(logits: Any, labels: Any, shift: bool = True, in_dtype: bool = False) -> float:
    """Mean cross-entropy (-100 ignored) in float64, or with `in_dtype` torch's own in the logits'
    dtype (what a model computing its loss there rounds to): each position's logits against the
    next label (`shift`, a decoder's loss) or against its own (an encoder-decoder's)."""
    import torch

    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.to(logits.device)
    if in_dtype:
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       labels.reshape(-1), ignore_index=-100))
    logits = logits.to(torch.float64)
    keep = labels != -100
    picked = logits[keep]
    return float((torch.logsumexp(picked, -1) - picked.gather(-1, labels[keep][:, None])[:, 0]).mean())


def _judge_loss(out: Any, ctx: Context) -> tuple[str | None, dict[str, Any]]:
    """The returned loss is the cross-entropy of the returned logits (shifted by one for a
    decoder, `loss_labels`)."""
    import torch

    labels, shift = loss_labels(ctx.variant, ctx.ids, ctx.mask)
    scored = labels[:, 1:] if shift else labels
    if not bool((scored != -100).any()):
        return None, {"loss": "no token to predict (every row has one real token)"}
    loss = getattr(out, "loss", None)
    if loss is None:
        return "labels passed, no loss returned", {}
    low_precision = loss.dtype not in (torch.float32, torch.float64)
    loss = float(loss)
    logits = out.logits.detach().to("cpu")
    own = cross_entropy(logits, labels, shift)
    # some models return the loss in the run dtype (4.48's gpt_neox: bf16): allow its rounding
    tol = max(tolerances.LOSS_SELF_REL, compare.eps(ctx.dtype)) * max(1.0, abs(own))
    figures: dict[str, Any] = {"loss": loss, "loss_from_logits": own, "loss_self_diff": abs(loss - own)}
    if low_precision:  # and where it computes it there (encoder-decoders): a cross-entropy's rounding
        rounding = abs(cross_entropy(logits, labels, shift, in_dtype=True) - own)
        figures["loss_rounding"] = rounding
        tol = max(tol, tolerances.LOSS_ROUNDING_K * rounding)
    figures["loss_self_bound"] = tol
    if not abs(loss - own) <= tol:
        how = "labels shifted by one" if shift else "labels unshifted"
        return (f"the returned loss {loss:.6g} is not the cross-entropy of the returned logits "
                f"({own:.6g}, {how}; |diff| {abs(loss - own):.3g} > {tol:.3g})"), figures
    return None, figures


@dataclass(frozen=True)
class AttentionStack:
    """One stack of attention weights a model returns: the output field holding it, whether its
    queries see only the keys before them, and which side's mask its queries and keys follow."""

    field: str
    causal: bool
    queries: str  # "decoder" or "encoder": the side whose positions are its queries
    keys: str


DECODER_STACK = AttentionStack("attentions", True, "decoder", "decoder")
ENCODER_STACK = AttentionStack("attentions", False, "encoder", "encoder")
# an encoder-decoder returns three: the encoder's, the decoder's self-attention, and the decoder
# attending to the encoder (cross-attention: decoder queries, encoder keys)
SEQ2SEQ_STACKS = (AttentionStack("encoder_attentions", False, "encoder", "encoder"),
                  AttentionStack("decoder_attentions", True, "decoder", "decoder"),
                  AttentionStack("cross_attentions", False, "decoder", "encoder"))


def attention_stacks(kind: str) -> tuple[AttentionStack, ...]:
    return {"decoder": (DECODER_STACK,), "seq2seq": SEQ2SEQ_STACKS}.get(kind, (ENCODER_STACK,))


def stack_layers(config: Any, stack: AttentionStack, kind: str) -> int:
    """How many layers return weights in `stack`: an encoder-decoder's encoder and decoder each
    have their own count (encoder_layers / decoder_layers, T5's num_layers / num_decoder_layers)."""
    if kind != "seq2seq":
        return int(config.num_hidden_layers)
    if stack.queries == "encoder":
        return int(getattr(config, "encoder_layers", None) or config.num_layers)
    return int(getattr(config, "decoder_layers", None) or getattr(config, "num_decoder_layers", None)
               or config.num_layers)


def side_masks(loaded: Loaded, mask: Any) -> dict[str, Any]:
    """Each side's real positions for the drawn mask: the decoder's is the drawn one (every
    check's decoder inputs follow the batch, `running.with_decoder_inputs`); a token encoder's
    is the same, a speech encoder's is its whole fixed-length output (it takes no padding mask)."""
    import torch

    from conformance.zoo import speech_encoder, speech_encoder_positions

    real = mask.bool()
    config = loaded.model.config
    if speech_encoder(config):
        return {"decoder": real,
                "encoder": torch.ones(real.shape[0], speech_encoder_positions(config), dtype=torch.bool)}
    return {"decoder": real, "encoder": real}


def _judge_attentions(out: Any, ctx: Context) -> tuple[str | None, dict[str, Any]]:
    """Returned weights: causal stacks put no probability above the diagonal, none on masked
    keys, and (kernel-class) each layer's weights are within the kernel bound of eager float64's
    on each row alone; an encoder-decoder's three stacks each so. Not returned: recorded (the
    implementation's own choice, per stack)."""
    kind = ctx.variant.zoo.kind
    stacks = attention_stacks(kind)
    returned = [getattr(out, stack.field, None) for stack in stacks]
    if all(not a or all(w is None for w in a) for a in returned):
        return None, {"output_attentions": "not returned"}
    figures: dict[str, Any] = {"output_attentions": "returned"}
    sides = side_masks(ctx.variant, ctx.mask)
    for stack, attentions in zip(stacks, returned):
        layers = stack_layers(ctx.variant.model.config, stack, kind)
        label = "" if len(stacks) == 1 else f"{stack.field}: "
        if not attentions or len(attentions) != layers or any(a is None for a in attentions):
            count = len(attentions) if attentions else 0
            nones = sum(a is None for a in attentions) if attentions else 0
            return (f"{label}output_attentions=True returned {count} layers' weights ({nones} None) "
                    f"for {layers} layers"), figures
        problem = _attention_leaks(stack, attentions, ctx, sides, label, figures)
        if problem:
            return problem, figures
    if not ctx.kernel_class:
        return None, figures

    def differs(stack: AttentionStack, index: int, err: float, bound: float, ref_err: float) -> str:
        label = "" if len(stacks) == 1 else f"{stack.field}: "
        return (f"{label}layer {index}'s attention weights differ from eager float64's by {err:.3g} "
                f"> bound {bound:.3g} (eager {ctx.dtype}'s own error {ref_err:.3g})")

    return _against_golden(ctx, "output_attentions", stacks, out, "attention_err_per_layer",
                           differs, figures), figures


def _attention_leaks(stack: AttentionStack, attentions: Any, ctx: Context, sides: dict[str, Any],
                     label: str, figures: dict[str, Any]) -> str | None:
    """No weight on a masked key, nor (causal stacks) above the diagonal, for a real query."""
    import torch

    eps = compare.eps(ctx.dtype)
    queries_real, keys_real = sides[stack.queries], sides[stack.keys]
    suffix = "" if not label else f"_{stack.field}"
    worst_leak = 0.0
    for index, weights in enumerate(attentions):
        w = weights.detach().to("cpu", torch.float64)
        queries = queries_real[:, None, :, None].expand_as(w)
        masked_keys = (~keys_real)[:, None, None, :].expand_as(w)
        leak = float(w[queries & masked_keys].abs().max()) if bool((queries & masked_keys).any()) else 0.0
        if stack.causal:
            above = torch.ones(w.shape[-2:], dtype=torch.bool).triu(1)[None, None].expand_as(w)
            if bool((queries & above).any()):
                leak = max(leak, float(w[queries & above].abs().max()))
        worst_leak = max(worst_leak, leak)
        if not leak <= eps:
            figures["attention_leak" + suffix] = leak
            return (f"{label}layer {index}'s attention weights put {leak:.3g} on masked keys or above "
                    f"the diagonal (> {eps:.3g})")
    figures["attention_leak" + suffix] = max(worst_leak, figures.get("attention_leak" + suffix, 0.0))
    return None


def _real_part(layer_row: Any, queries: Any, keys: Any) -> Any:
    """One row of one layer's output over its real positions, float64 on CPU: attention weights
    [heads, queries, keys] over real queries and keys, a hidden state [positions, width] over its
    real positions."""
    import torch

    w = layer_row.detach().to("cpu", torch.float64)
    return w[:, queries][:, :, keys] if w.dim() == 3 else w[queries]


def _golden_layers(ctx: Context, flag: str, stacks: tuple[AttentionStack, ...]) -> dict[str, list[list[Any]]]:
    """Per stack, per row, each layer's golden output over the row's real positions: from each
    row alone (its every position real), or from the padded batch where golden is not per row.
    One golden call per row serves every stack."""
    import torch

    rows = range(ctx.ids.shape[0])
    if ctx.per_row:
        outs = []
        for row in rows:
            alone = ctx.ids[row][ctx.mask[row].bool()][None]
            outs.append(call_with(ctx.golden, alone, torch.ones_like(alone), {flag: True}))
        return {stack.field: [[_real_part(layer[0], slice(None), slice(None))
                               for layer in getattr(out, stack.field)] for out in outs]
                for stack in stacks}
    whole = call_with(ctx.golden, ctx.ids, ctx.mask, {flag: True})
    sides = side_masks(ctx.golden, ctx.mask)
    return {stack.field: [[_real_part(layer[row], sides[stack.queries][row], sides[stack.keys][row])
                           for layer in getattr(whole, stack.field)] for row in rows]
            for stack in stacks}


def _against_golden(ctx: Context, flag: str, stacks: tuple[AttentionStack, ...], out: Any,
                    figure: str, differs: Callable[[AttentionStack, int, float, float, float], str],
                    figures: dict[str, Any]) -> str | None:
    """Each layer of each stack within the kernel bound of eager float64's, on every row's real
    positions, in units of the plain reference's own error at that layer (`compare.kernel_bound`).
    The reference and golden run once with `flag` for all stacks."""
    plain = call_with(ctx.reference, ctx.ids, ctx.mask, {flag: True})
    golden = _golden_layers(ctx, flag, stacks)
    sides = side_masks(ctx.variant, ctx.mask)
    for stack in stacks:
        suffix = "" if len(stacks) == 1 else f"_{stack.field}"
        got_layers, plain_layers = getattr(out, stack.field), getattr(plain, stack.field)
        for index in range(len(got_layers)):
            err = ref_err = scale = 0.0
            for row, want in enumerate(golden[stack.field]):
                q, k = sides[stack.queries][row], sides[stack.keys][row]
                got = _real_part(got_layers[index][row], q, k)
                ref = _real_part(plain_layers[index][row], q, k)
                err = max(err, float((got - want[index]).abs().max()))
                ref_err = max(ref_err, float((ref - want[index]).abs().max()))
                scale = max(scale, float(want[index].abs().max()))
            bound = compare.kernel_bound(ref_err, scale, ctx.dtype, ctx.variant.zoo.kind)[0]
            figures.setdefault(figure + suffix, []).append(err)
            if not err <= bound:
                return differs(stack, index, err, bound, ref_err)
    return None


# the hidden states a model returns, per side: one stack (decoders, encoders) or an
# encoder-decoder's two (a side's queries and keys are its own positions)
DECODER_STATES = AttentionStack("hidden_states", True, "decoder", "decoder")
ENCODER_STATES = AttentionStack("hidden_states", False, "encoder", "encoder")
SEQ2SEQ_STATES = (AttentionStack("encoder_hidden_states", False, "encoder", "encoder"),
                  AttentionStack("decoder_hidden_states", True, "decoder", "decoder"))


def state_stacks(kind: str) -> tuple[AttentionStack, ...]:
    return {"decoder": (DECODER_STATES,), "seq2seq": SEQ2SEQ_STATES}.get(kind, (ENCODER_STATES,))


def _judge_hidden_states(out: Any, ctx: Context) -> tuple[str | None, dict[str, Any]]:
    """One hidden state per layer and the embeddings, for each side an encoder-decoder has;
    kernel-class variants: each within the kernel bound of eager float64's on each row alone, in
    units of the plain reference's own error at that layer."""
    kind = ctx.variant.zoo.kind
    stacks = state_stacks(kind)
    figures: dict[str, Any] = {}
    for stack in stacks:
        label = "" if len(stacks) == 1 else f"{stack.field}: "
        suffix = "" if len(stacks) == 1 else f"_{stack.field}"
        states = getattr(out, stack.field, None)
        layers = stack_layers(ctx.variant.model.config, stack, kind)
        if states is None or len(states) != layers + 1:
            return (f"{label}output_hidden_states=True returned {0 if states is None else len(states)} "
                    f"states for {layers} layers (expected {layers + 1})"), figures
        figures["hidden_states" + suffix] = len(states)
        nested = [index for index, state in enumerate(states) if getattr(state, "is_nested", False)]
        if nested:  # BetterTransformer's encoder packs a padded batch between its layers
            figures["nested_hidden_states" + suffix] = nested
            return (f"{label}output_hidden_states=True returned hidden states {nested} as NestedTensors "
                    f"(a packed layout), where the plain call returns [batch, seq, hidden] tensors: "
                    f"indexing them fails (aten::index has no NestedTensor kernel)"), figures
    if not ctx.kernel_class:
        return None, figures

    def differs(stack: AttentionStack, index: int, err: float, bound: float, ref_err: float) -> str:
        label = "" if len(stacks) == 1 else f"{stack.field}: "
        after = "the embeddings" if index == 0 else f"layer {index - 1}"
        return (f"{label}hidden state {index} (after {after}) differs from eager float64's by "
                f"{err:.3g} > bound {bound:.3g}")

    return _against_golden(ctx, "output_hidden_states", stacks, out, "hidden_err_per_layer",
                           differs, figures), figures


def call_with(loaded: Loaded, ids: Any, mask: Any, extra: dict[str, Any]) -> Any:
    from conformance.running import call_model, plain_inputs

    inputs = {**plain_inputs(loaded, ids, mask), **extra}
    if "input_ids" in inputs and inputs["input_ids"] is None:
        del inputs["input_ids"]
    return call_model(loaded, inputs)


OPTIONS: dict[str, Option] = {o.name: o for o in [
    Option("output_attentions", "output_attentions=True: the weights, where returned, are eager's",
           BOTH | SEQ2SEQ, _flag("output_attentions", internals=True), same_kernels=False,
           extra=_judge_attentions),
    Option("return_dict_false", "return_dict=False: a tuple, logits first", BOTH | SEQ2SEQ,
           _flag("return_dict", False)),
    # not bitwise: without a cache the keys stay views of the projection, with one they are the
    # cache's contiguous copy, and the product rounds otherwise (measured on 5.24: falcon eager,
    # 2 rows of 5 tokens, fp32, 1.67e-06 on every run; with use_cache=True, 0.0)
    Option("use_cache_false", "use_cache=False", DECODER | SEQ2SEQ, _flag("use_cache", False),
           same_kernels=False),
    Option("use_cache_true", "use_cache=True", DECODER | SEQ2SEQ, _flag("use_cache", True)),
    Option("inputs_embeds", "inputs_embeds (the model's own embeddings of the ids) instead of input_ids",
           BOTH | SEQ2SEQ, _inputs_embeds),
    Option("decoder_inputs_embeds", "decoder_inputs_embeds (the decoder's own embeddings of its ids) "
           "instead of decoder_input_ids", SEQ2SEQ, _decoder_inputs_embeds),
    Option("token_type_ids", "token_type_ids of zeros (the default segment)", ENCODER, _token_type_ids),
    Option("output_hidden_states", "output_hidden_states=True: every layer's state",
           BOTH | SEQ2SEQ, _flag("output_hidden_states", internals=True), extra=_judge_hidden_states),
    Option("labels", "labels: the loss is the cross-entropy of the logits", DECODER | SEQ2SEQ, _labels,
           extra=_judge_loss),
    Option("cache_position", "an explicit cache_position", DECODER, _cache_position),
    Option("mask_none_cached", "no attention_mask at any step of cached decoding (vs all ones)",
           DECODER, _form(pass_mask=False), same_kernels=False, cached=True, unpadded=True),
    Option("cache_explicit_dynamic", "a DynamicCache() passed at prefill (vs the one the model builds)",
           DECODER, _form(explicit_cache=True), same_kernels=False, cached=True),
    Option("cache_legacy_tuple", "the legacy tuple cache between steps (transformers 4.x)",
           DECODER, _form(legacy=True), same_kernels=False, cached=True),
]}
