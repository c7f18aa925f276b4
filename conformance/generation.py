"""Greedy generation equivalence with the near-tie rule.

Two correct paths may pick different greedy tokens only where the reference's choice was a near
tie: at the first divergent step, the reference's logit margin between its pick and the
variant's pick must be below twice the error the variant is allowed at that step (a flip needs
the two logits to move towards each other by the margin). Anything else is a wrong answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conformance import tolerances
from conformance.compare import kernel_bound
from conformance.running import Loaded, forward_ids, run_inputs


@dataclass(frozen=True)
class Divergence:
    row: int
    step: int
    reference_token: int
    variant_token: int
    margin: float
    threshold: float

    @property
    def near_tie(self) -> bool:
        return self.margin <= self.threshold


def prompts(location: str, count_hint: int = 16) -> list[list[int]] | None:
    """Token ids of the shipped prompts under the model's own tokenizer; None if it has none."""
    from conformance.zoo import fixtures_dir

    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(location)
    except Exception:
        return None
    lines = (Path(fixtures_dir()) / "text" / "prompts.txt").read_text().splitlines()
    out = [tokenizer(line, add_special_tokens=False)["input_ids"] for line in lines if line.strip()]
    return [ids for ids in out if ids][:count_hint]


@dataclass(frozen=True)
class Seq2SeqPrefix:
    """An encoder-decoder's prefix: the prompt the encoder reads and the tokens generated so far."""

    prompt: Any
    generated: Any


def prefix_of(kind: str, prompt: Any, generated: Any) -> Any:
    """What a next-token prediction conditions on: a decoder's prompt and tokens in one
    sequence, an encoder-decoder's prompt (encoder) and tokens (decoder) apart."""
    import torch

    return Seq2SeqPrefix(prompt, generated) if kind == "seq2seq" else torch.cat([prompt, generated])


def step_logits(loaded: Loaded, prefix: Any) -> Any:
    """Logits [T, V] of each row-alone, unpadded, uncached step: a decoder's over its sequence;
    an encoder-decoder's over the decoder start token and the generated tokens (the prediction
    of generated token j at position j), the prompt in the encoder."""
    import torch

    if not isinstance(prefix, Seq2SeqPrefix):
        return forward_ids(loaded, prefix[None], torch.ones_like(prefix)[None])[0]
    start = torch.tensor([int(loaded.model.config.decoder_start_token_id)])
    decoder = torch.cat([start, prefix.generated.to(torch.long)])[None]
    inputs = {"input_ids": prefix.prompt[None], "attention_mask": torch.ones_like(prefix.prompt)[None],
              "decoder_input_ids": decoder}
    return run_inputs(loaded, {k: v.to(loaded.device) for k, v in inputs.items()})[0]


def allowed_error(loaded: Loaded, reference: Loaded, golden: Loaded, prefix: Any) -> float:
    """The per-logit error `loaded` is allowed on the next-token logits after `prefix`.

    Kernel variants: K x the reference's measured error + floor (tolerances.KERNEL). Quantized
    variants: the scheme's relative-L2 bound times the RMS of the golden logits.
    """
    gold = step_logits(golden, prefix)[-1]
    if not loaded.variant.kernel_class:
        bound = tolerances.quant(loaded.variant.tolerance).max_rel_l2
        return bound * float(gold.pow(2).mean().sqrt())
    plain = step_logits(reference, prefix)[-1]
    return kernel_allowed(plain, gold, loaded.dtype, loaded.zoo.kind)


def kernel_allowed(plain: Any, gold: Any, dtype: str, kind: str = "") -> float:
    """K x the plain path's error on these logits, capped at its envelope, + the kind's floor."""
    bound, _, _ = kernel_bound(float((plain - gold).abs().max()), float(gold.abs().max()), dtype, kind)
    return bound


def golden_departures(
    loaded: Loaded, reference: Loaded, golden: Loaded, prompt_rows: list[Any], tokens: Any,
    eos: int | None,
) -> tuple[list[Divergence], int]:
    """Where a path's greedy tokens depart from the golden run's own choice on the same prefix.

    Teacher-forced: each row alone, the prompt plus the path's tokens, one golden forward (eager
    float64, no cache, no padding) gives the golden next-token logits at every step. Nothing of
    generate's integration (its cache, mask and position handling) is in that judge, so a bug
    there, shared by the path and the plain reference, still shows. A departure is allowed only
    as a near tie: the golden margin between its pick and the path's pick within 2 x the error
    the path is allowed there. Returns the first departure of each row and the steps compared.
    """

    found, compared = [], 0
    for row, prompt in enumerate(prompt_rows):
        steps = tokens.shape[1]
        if eos is not None:
            ends = (tokens[row] == eos).nonzero()
            steps = int(ends[0]) + 1 if len(ends) else steps
        seq2seq = loaded.zoo.kind == "seq2seq"
        whole = prefix_of(loaded.zoo.kind, prompt, tokens[row, :steps])
        start = 0 if seq2seq else len(prompt) - 1
        gold = step_logits(golden, whole)[start:start + steps]
        plain = None
        if loaded.variant.kernel_class:
            plain = step_logits(reference, whole)[start:start + steps]
        for step in range(steps):
            compared += 1
            got, want = int(tokens[row, step]), int(gold[step].argmax())
            if got == want:
                continue
            margin = float(gold[step, want] - gold[step, got])
            if plain is not None:
                threshold = 2 * kernel_allowed(plain[step], gold[step], loaded.dtype, loaded.zoo.kind)
            else:
                threshold = near_tie_threshold(loaded, reference, golden,
                                               prefix_of(loaded.zoo.kind, prompt, tokens[row, :step]))
            found.append(Divergence(row, step, want, got, margin, threshold))
            break
    return found, compared


def near_tie_threshold(loaded: Loaded, reference: Loaded, golden: Loaded, prefix: Any) -> float:
    """How far apart the reference's two candidate tokens may be for a flip to be a near tie.

    2 x the allowed per-logit error (both logits may move by it). A quantized scheme's allowed
    error comes from its relative-L2 bound, which random-init models make loose; where the
    scheme's flip margin was measured on real weights (tolerances.QUALITY), that caps it.
    """
    allowed = 2 * allowed_error(loaded, reference, golden, prefix)
    if loaded.variant.kernel_class:
        return allowed
    measured = tolerances.quality(loaded.variant.tolerance, loaded.variant.id).max_flip_margin
    return allowed if measured is None else min(allowed, measured)


def first_divergences(
    prompt_rows: list[Any], ref_tokens: Any, ref_logits: Any, var_tokens: Any, eos: int | None,
    threshold: Any,
) -> tuple[list[Divergence], int]:
    """The first divergent step of each row (compared up to the reference's end of sequence),
    and how many tokens were compared. `threshold(row, step)` gives the near-tie threshold."""
    found, compared = [], 0
    for row in range(ref_tokens.shape[0]):
        for step in range(ref_tokens.shape[1]):
            want, got = int(ref_tokens[row, step]), int(var_tokens[row, step])
            compared += 1
            if want != got:
                margin = float(ref_logits[row, step, want] - ref_logits[row, step, got])
                found.append(Divergence(row, step, want, got, margin, threshold(row, step)))
                break
            if eos is not None and want == eos:
                break
    return found, compared
