"""Generation equivalence (C03, C06, C08-C11 by variant): greedy `generate` of a variant on
left-padded batches of the shipped prompts gives the reference's tokens, except at genuine near
ties (conformance/generation.py); an encoder-decoder's prompts are its encoder input. Runs on
trained models only: random weights make greedy
decoding a coin toss, where every divergence is a near tie and the check could never fail."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from conformance import decoding, generation
from conformance.cases import Case
from conformance.checks import load_or_fail, unrefused
from conformance.running import ModelCache
from conformance.strategies import pad_rows

NEW_TOKENS = 12


@pytest.mark.cases(kinds=frozenset({"decoder", "seq2seq"}), model_filter=lambda model: model.trained)
def test_generation(case: Case, model_cache: ModelCache, metrics: dict[str, Any]) -> None:
    import torch

    variant, reference, golden = load_or_fail(model_cache, case)
    corpus = generation.prompts(case.model.location)
    if not corpus:
        pytest.skip(f"{case.model.name} has no tokenizer to encode the shipped prompts with")
    eos = getattr(reference.model.config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) else eos
    metrics.update(tokens_compared=0, divergences=[], batches=0)

    @given(picks=st.lists(st.tuples(st.integers(0, len(corpus) - 1), st.integers(1, 24)),
                          min_size=1, max_size=4))
    def check(picks: list[tuple[int, int]]) -> None:
        rows = [torch.tensor(corpus[i][:n]) for i, n in picks]
        # a decoder generates after its prompt, so prompts pad on the left; an encoder-decoder's
        # prompts are its encoder input, padded on the right as its tokenizer does (BART's
        # absolute positions move with left padding by design)
        side = "right" if case.model.kind == "seq2seq" else "left"
        ids, mask = pad_rows(rows, side, reference.pad_id)
        note(f"prompts (index, truncated to): {picks}; {side}-padded to {ids.shape[1]}")
        ref_tokens, ref_logits = decoding.greedy(reference, ids, mask, NEW_TOKENS)
        var_tokens, _ = unrefused(variant, lambda: decoding.greedy(variant, ids, mask, NEW_TOKENS))

        def threshold(row: int, step: int) -> float:
            prefix = generation.prefix_of(case.model.kind, rows[row], ref_tokens[row, :step])
            return generation.near_tie_threshold(variant, reference, golden, prefix)

        found, compared = generation.first_divergences(rows, ref_tokens, ref_logits, var_tokens, eos,
                                                       threshold)
        metrics["tokens_compared"] += compared
        metrics["batches"] += 1
        metrics["divergences"] += [vars(d) | {"near_tie": d.near_tie} for d in found]
        departures, _ = generation.golden_departures(variant, reference, golden, rows, var_tokens, eos)
        metrics["golden_departures"] = metrics.get("golden_departures", []) + [
            vars(d) | {"near_tie": d.near_tie} for d in departures]
        for d in departures:  # the independent judge: golden decoding of the same prefix
            assert d.near_tie, (
                f"{case.id}: row {d.row} step {d.step}: generate picked token {d.variant_token} "
                f"where the golden run (eager float64, each row alone, no cache) picks "
                f"{d.reference_token} by margin {d.margin:.3g}, beyond the near-tie threshold "
                f"{d.threshold:.3g} (2 x the path's allowed error)")
        for d in found:
            assert d.near_tie, (
                f"{case.id}: row {d.row} diverged at step {d.step}: reference picked token "
                f"{d.reference_token}, variant {d.variant_token}; reference margin {d.margin:.3g} "
                f"exceeds the near-tie threshold {d.threshold:.3g} (2 x the variant's allowed error, "
                "or its scheme's measured flip margin)")

    check()
