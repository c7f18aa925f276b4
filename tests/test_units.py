"""Unit tests of the suite's building blocks (no model loading)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given

from conformance import compare, float64, tolerances, variants
from conformance.environment import Environment
from conformance.needs import Needs
from conformance.probes import OpCounter, Proof
from conformance.strategies import BOUNDARY_LENGTHS, BatchSpec, batch_specs
from conformance.zoo import ZooError, default_zoo, kind_of, resolve

CPU = Environment(device="cpu", kind="cpu", name="test")


def test_left_and_right_masks() -> None:
    left = BatchSpec((3, 1), "left").mask()
    right = BatchSpec((3, 1), "right").mask()
    assert left.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert right.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_materialize_puts_pad_ids_only_at_padding() -> None:
    ids, mask = BatchSpec((4, 2), "left", seed=3).materialize(vocab_size=50, pad_id=1)
    assert ((ids == 1) == (mask == 0)).all()
    assert ids[mask.bool()].min() >= 4


@given(batch=batch_specs(max_len=129))
def test_drawn_batches_are_well_formed(batch: BatchSpec) -> None:
    assert all(1 <= n <= 129 for n in batch.lengths)
    if batch.padding == "none":
        assert len(set(batch.lengths)) == 1
    else:
        assert len(batch.lengths) >= 2 and max(batch.lengths) == batch.width


def test_boundary_lengths_cover_kernel_tiles() -> None:
    assert {31, 32, 33, 63, 64, 65, 127, 128, 129} <= set(BOUNDARY_LENGTHS)


def test_needs_reason_names_what_and_where() -> None:
    needs = Needs(packages={"transformers": "<1.0"}, where="the legacy stack")  # unmet on any stack
    reason = needs.unmet(CPU)
    assert reason is not None and reason.startswith("needs transformers<1.0 (installed: ")
    assert reason.endswith("run on the legacy stack")
    assert Needs(devices=frozenset({"cuda"})).unmet(CPU).startswith("needs a cuda device")
    assert Needs(packages={"no-such-dist": ""}).unmet(CPU).startswith("needs no-such-dist")
    assert Needs().unmet(CPU) is None


def test_needs_on_device_are_named_as_such() -> None:
    needs = Needs(packages={"torch": ">=2.0"}, packages_on={"cpu": {"torch": "<1.0"}})
    assert "needs torch<1.0 on cpu (installed: " in needs.unmet(CPU)
    unmet_globally = Needs(packages={"torch": "<1.0"}, packages_on={"cpu": {"torch": ">=2.0"}})
    assert "needs torch<1.0 (installed: " in unmet_globally.unmet(CPU)


def test_variant_glob_selection_and_unmatched() -> None:
    chosen, unmatched = variants.select(["sdpa_*", "nothing*"])
    assert {v.id for v in chosen} >= {"sdpa_math", "sdpa_flash"}
    assert unmatched == ["nothing*"]


def test_every_variant_names_claims_and_a_known_tolerance() -> None:
    for variant in variants.REGISTRY.values():
        assert variant.claims, variant.id
        assert variant.tolerance == "kernel" or variant.tolerance in tolerances.QUANT
        assert variant.proof, f"{variant.id} must say which ops prove its path ran"


@pytest.mark.parametrize(("changes", "says"), [
    ({"claims": ("C99",)}, "unknown claim ids ['C99']"),
    ({"tolerance": "int3"}, "tolerance 'int3' is neither 'kernel' nor a scheme"),
    ({"kinds": frozenset({"decoder", "vision"})}, "must be model kinds"),
    ({"proof": {"decoder": variants.SDPA_PROOF}},
     "no proof that its path ran on ['encoder', 'seq2seq'] models"),
])
def test_a_record_is_checked_where_it_is_declared(changes: dict, says: str) -> None:
    """Variant.__post_init__: a typo in a record is an error naming it, at import (the whole
    registry above loaded without one)."""
    from dataclasses import replace

    with pytest.raises(ValueError, match=r"variant 'sdpa'") as raised:
        replace(variants.REGISTRY["sdpa"], **changes)
    assert says in str(raised.value)


def test_quant_bounds_are_their_measurement() -> None:
    """QUANT: 1.5 x the worst measured relative-L2 error, rounded up (tolerances.py says where)."""
    assert set(tolerances.QUANT) == set(tolerances.QUANT_MEASURED_MAX)
    for scheme, worst in tolerances.QUANT_MEASURED_MAX.items():
        assert 1.5 * worst <= tolerances.QUANT[scheme].max_rel_l2 <= 1.1 * 1.5 * worst, scheme


def test_quality_bounds_are_their_measurement() -> None:
    """QUALITY: 2 x each measured distance from a perfect answer, rounded outward (never inward,
    and by less than 40% of that distance)."""
    fields = {"mean_kl": ("max_mean_kl", 0.0), "top1": ("min_top1", 1.0),
              "perplexity_ratio": ("max_perplexity_ratio", 1.0), "min_cosine": ("min_cosine", 1.0),
              "mean_cosine": ("min_mean_cosine", 1.0), "flip_margin": ("max_flip_margin", 0.0)}
    assert set(tolerances.QUALITY) == set(tolerances.QUALITY_MEASURED)
    for scheme, measured in tolerances.QUALITY_MEASURED.items():
        for name, worst in measured.items():
            field, perfect = fields[name]
            bound = getattr(tolerances.QUALITY[scheme], field)
            assert bound is not None, (scheme, field)
            want, given_ = 2 * abs(worst - perfect), abs(bound - perfect)
            assert want <= given_ + 1e-12 <= 1.4 * want + 1e-12, (scheme, name, bound, worst)


def test_kernel_verdict_passes_within_and_fails_beyond_bound() -> None:
    golden = torch.linspace(-3, 3, 2 * 4 * 8, dtype=torch.float64).reshape(2, 4, 8)
    real = torch.ones(2, 4, dtype=torch.bool)
    reference = golden + 1e-3
    ok, figures = compare.kernel_verdict(golden + 1.5e-3, reference, golden, real, "bf16")
    assert ok is None and figures["err_over_ref_err"] == pytest.approx(1.5)
    bad, _ = compare.kernel_verdict(golden + 6e-2, reference, golden, real, "bf16")
    assert bad is not None and "max|variant - golden|" in bad


def test_seq2seq_fp32_floor_covers_the_measured_sdpa_gap_and_nothing_like_a_bug() -> None:
    """The trained BART's SDPA at 68.9 ulps of max|golden| beside an eager run at 8.7 (legacy ci,
    2026-12-07) passes under the encoder-decoders' own floor and fails under the default one; an
    error of 1e-3 relative fails under both."""
    golden = torch.linspace(-11.88, 11.88, 2 * 4 * 8, dtype=torch.float64).reshape(2, 4, 8)
    real = torch.ones(2, 4, dtype=torch.bool)
    unit = compare.eps("fp32") * 11.88
    reference, variant = golden + 8.7 * unit, golden + 68.9 * unit
    assert compare.kernel_verdict(variant, reference, golden, real, "fp32", "seq2seq")[0] is None
    assert compare.kernel_verdict(variant, reference, golden, real, "fp32", "decoder")[0] is not None
    buggy = golden + 1e-3 * 11.88
    assert compare.kernel_verdict(buggy, reference, golden, real, "fp32", "seq2seq")[0] is not None
    assert tolerances.kernel("bf16", "seq2seq") == tolerances.kernel("bf16")


def test_padded_positions_are_not_compared_but_must_stay_finite() -> None:
    golden = torch.zeros(1, 3, 4, dtype=torch.float64)
    real = torch.tensor([[True, True, False]])
    variant = golden.clone()
    variant[0, 2] = 100.0  # padded: not compared
    assert compare.kernel_verdict(variant, golden + 1e-6, golden, real, "fp32")[0] is None
    variant[0, 2] = float("nan")
    assert "padded positions" in compare.finiteness(variant, golden, golden, real)
    variant[0, 0, 0] = float("nan")
    assert "real tokens" in compare.finiteness(variant, golden, golden, real)


def test_nan_golden_is_an_error_not_a_pass() -> None:
    golden = torch.full((1, 2, 3), float("nan"), dtype=torch.float64)
    real = torch.ones(1, 2, dtype=torch.bool)
    assert "golden run is non-finite" in compare.finiteness(golden, golden, golden, real)


def test_op_counter_sees_the_forced_kernel() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 8, 16)
    proof = Proof(("aten::_scaled_dot_product_flash_attention*",), minimum=1)
    for backend, expect_ok in ((SDPBackend.FLASH_ATTENTION, True), (SDPBackend.MATH, False)):
        counter = OpCounter()
        with torch.inference_mode(), sdpa_kernel(backend), counter:
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
        problem, _ = proof.verdict(counter, model=None)
        assert (problem is None) is expect_ok, (backend, problem)


def test_zoo_has_the_promised_architectures() -> None:
    names = {m.name for m in default_zoo()}
    assert {"llama", "mistral", "falcon", "gpt2", "opt", "gpt_neox", "qwen2", "bert", "roberta",
            "distilbert"} <= names


def test_zoo_errors_are_one_line() -> None:
    with pytest.raises(ZooError, match="no such directory"):
        resolve("./nope", default_zoo())
    with pytest.raises(ZooError, match="architecture 'pegasus'"):
        kind_of("pegasus", "--model x")


def test_expectation_patterns_match_fragments_and_globs(tmp_path: Path) -> None:
    from conformance.reporting.expectations import matches, parse

    file = tmp_path / "x.txt"
    file.write_text("# reason one\ntest_logits[falcon-bnb_\n"
                    "test_cache_consistency[*-bnb_nf4-fp32*  # inline\n")
    plain, glob = parse(str(file))
    assert plain.reason == "reason one" and glob.reason == "inline"
    assert matches(plain, "suite/test_logits.py::test_logits[falcon-bnb_int8-fp32-nopad]")
    assert not matches(plain, "suite/test_logits.py::test_logits[llama-bnb_int8-fp32-nopad]")
    assert matches(glob, "x.py::test_cache_consistency[llama-bnb_nf4-fp32-nopad-static]")
    assert not matches(glob, "x.py::test_cache_consistency[llama-bnb_nf4-bf16-nopad-static]")
    assert not matches(glob, "x.py::test_logits[llama-bnb_nf4-fp32-nopad]")


def _golden_and_real() -> tuple[torch.Tensor, torch.Tensor]:
    golden = torch.linspace(-4, 4, 2 * 3 * 8, dtype=torch.float64).reshape(2, 3, 8)
    return golden, torch.ones(2, 3, dtype=torch.bool)


def test_a_broken_reference_never_widens_a_variants_bound() -> None:
    """The bound uses the reference error capped at its envelope: a reference off by 1.0 (a bug it
    shares with the variant) gives the variant the same bound as a reference at its envelope."""
    golden, real = _golden_and_real()
    envelope = compare.reference_envelope("fp32", float(golden.abs().max()))
    at_envelope = golden + envelope
    broken = golden + 1.0
    _, capped = compare.kernel_verdict(golden + 1.0, broken, golden, real, "fp32")
    _, healthy = compare.kernel_verdict(golden, at_envelope, golden, real, "fp32")
    assert capped["bound"] == pytest.approx(healthy["bound"])
    problem, _ = compare.kernel_verdict(golden + 1.0, broken, golden, real, "fp32")
    assert problem is not None and "capped at its envelope" in problem


def test_reference_verdict_fails_outside_its_envelope_only() -> None:
    golden, real = _golden_and_real()
    envelope = compare.reference_envelope("fp32", float(golden.abs().max()))
    assert compare.reference_verdict(golden + 0.5 * envelope, golden, real, "fp32", "m")[0] is None
    problem, figures = compare.reference_verdict(golden + 2 * envelope, golden, real, "fp32", "m")
    assert problem is not None and problem.startswith("REF failure: plain eager fp32 on m")
    assert figures["ref_over_envelope"] == pytest.approx(2.0)


def test_float64_agreement_verdict_bounds_in_fp64_ulps() -> None:
    golden, real = _golden_and_real()
    eps64 = torch.finfo(torch.float64).eps
    assert compare.agreement_verdict(golden + 4 * eps64 * 4, golden, real, 16, "x")[0] is None
    problem, _ = compare.agreement_verdict(golden + 1e-9, golden, real, 16, "x")
    assert problem is not None and "float64 envelope" in problem
    nan = golden.clone()
    nan[0, 0, 0] = float("nan")
    assert "non-finite" in compare.agreement_verdict(nan, golden, real, 16, "x")[0]


def test_envelopes_are_twice_their_measurement() -> None:
    """Each envelope is 2 x the worst measured figure, rounded up (tolerances.py says where)."""
    measured = {"fp32": 58.5, "bf16": 14.4}
    for dtype, worst in measured.items():
        assert 2 * worst <= tolerances.REFERENCE_ENVELOPE_ULPS[dtype] <= 2.5 * worst
    assert 2 * 15.3 <= tolerances.FLOAT64_AGREEMENT_ULPS["default"] <= 2.5 * 15.3
    assert 2 * 68.2 <= tolerances.FLOAT64_AGREEMENT_ULPS["seq2seq"] <= 2.5 * 68.2
    table = tolerances.FLOAT64_AGREEMENT_ULPS
    assert tolerances.float64_agreement_ulps("sdpa", "seq2seq") == table["seq2seq"]
    assert tolerances.float64_agreement_ulps("sdpa", "decoder") == table["default"]


def test_golden_context_keeps_softmax_in_float64_and_restores_defaults() -> None:
    x = torch.randn(3, 5, dtype=torch.float64)
    with variants.GOLDEN.context():
        assert torch.get_default_dtype() == torch.float64
        inside = torch.nn.functional.softmax(x, dim=-1, dtype=torch.float32)
    assert inside.dtype == torch.float64
    assert torch.get_default_dtype() == torch.float32
    assert torch.nn.functional.softmax(x, dim=-1, dtype=torch.float32).dtype == torch.float32


def _rms_norm_as_transformers_writes_it(x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic: an upcast to float32 for half-precision models, then back."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return h.to(input_dtype)


def test_float64_kept_closes_float32_islands_and_nothing_else() -> None:
    """Inside float64.kept() the casts model code writes for precision keep float64 tensors in
    float64 (the golden run and test_float64_agreement); other tensors and casts are untouched."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    exact = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert (_rms_norm_as_transformers_writes_it(x) - exact).abs().max() > 1e-9  # the island
    with float64.kept():
        normed = _rms_norm_as_transformers_writes_it(x)
        assert x.float().dtype == x.half().dtype == x.bfloat16().dtype == torch.float64
        assert x.to("cpu", torch.float32).dtype == x.to(dtype=torch.float16).dtype == torch.float64
        assert x.type(torch.float32).dtype == x.type_as(x.float()).dtype == torch.float64
        assert x.to(torch.zeros(1, dtype=torch.float32)).dtype == torch.float64
        assert torch.nn.functional.softmax(x, -1, dtype=torch.float32).dtype == torch.float64
        assert x.softmax(-1, dtype=torch.float32).dtype == torch.float64
        assert torch.log_softmax(x, -1, dtype=torch.bfloat16).dtype == torch.float64
        assert x.to(torch.int64).dtype == torch.int64  # other casts as written
        assert x.float().to(torch.float32).dtype == torch.float64
        small = torch.randn(3)  # float32 tensors are not touched
        assert small.to(torch.float16).dtype == torch.float16
    assert torch.equal(normed, exact)
    assert x.float().dtype == torch.float32  # and nothing outlives the context


@pytest.mark.parametrize(("entry", "logits", "outcome", "fails"), [
    ({"error": "tp3 failed llama in fp32: ValueError: tp_size 3 must divide 4 attention heads",
      "at_load": True}, None, "refused at load", False),
    ({"error": "tp3 failed llama in fp32: KeyError: 'model.layers.0'", "at_load": True}, None,
     "refused at load", True),
    ({"error": "RuntimeError: start (0) + length (3072) exceeds dimension size (192).",
      "at_load": False}, None, "failed after loading", True),
    ({}, {"error": "AttributeError: 'Tensor' object has no attribute 'CB'"}, "crashed", True),
    ({}, torch.zeros(1, 2, 3), "ran", False),
])
def test_a_sharding_limit_is_refused_clearly_or_runs(entry: dict, logits: object, outcome: str,
                                                     fails: bool) -> None:
    """test_distributed_limits: a clear one-line refusal at load passes; an unclear one, a crash
    after an accepted load, or a worker failure fails; a run goes on to the ordinary verdict."""
    from conformance.distributed import limit_outcome

    got, problem = limit_outcome(entry, logits)
    assert got == outcome
    assert (problem is not None) == fails


def test_two_runs_part_where_their_difference_first_leaves_the_bound() -> None:
    """localize.between: the first point (in compute order) where two runs differ by more than K x
    the reference's rounding error there + floor; with exact=True, by anything at all."""
    from conformance import localize

    golden = {(0, "self_attn"): torch.ones(4, 8, dtype=torch.float64),
              (0, "output"): torch.ones(4, 8, dtype=torch.float64),
              (1, "self_attn"): torch.ones(4, 8, dtype=torch.float64)}
    reference = {p: t + 1e-6 for p, t in golden.items()}
    first = {p: t.clone() for p, t in golden.items()}
    second = {p: t.clone() for p, t in golden.items()}
    second[(0, "output")] += 1e-9  # inside the bound (2 x 1e-6 + floor)
    second[(1, "self_attn")] += 1e-2
    found = localize.between(first, second, reference, golden, "fp32")
    assert (found["layer"], found["point"]) == (1, "self_attn"), found
    assert "layers 0 clean" in found["text"]
    exact = localize.between(first, second, reference, golden, "fp32", exact=True)
    assert (exact["layer"], exact["point"]) == (0, "output"), exact
    assert "agree at every layer" in localize.between(first, first, reference, golden, "fp32")["text"]


def test_golden_is_float64_only_where_it_fits_in_its_share_of_memory() -> None:
    from conformance.sizing import GOLDEN_FP64_SHARE, golden_choice

    available = 20 * 2**30
    fits = int(GOLDEN_FP64_SHARE * available / 8)
    assert golden_choice(fits, available).fp64
    assert not golden_choice(fits + 1, available).fp64
    assert "exceeds" in golden_choice(fits + 1, available).why
    assert golden_choice(None, available).fp64  # nothing local to size: float64, and it says so


def test_parameters_are_counted_from_headers_without_loading(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from conformance.sizing import parameter_count

    assert parameter_count(tmp_path) is None
    (tmp_path / "pytorch_model.bin").write_bytes(b"x" * 100)
    assert parameter_count(tmp_path) == 50  # no header: 16-bit storage assumed, an upper bound
    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16)},
              str(tmp_path / "model.safetensors"))
    assert parameter_count(tmp_path) == 17  # safetensors present: exact, the .bin ignored


def test_noise_unit_is_the_envelope_where_golden_is_no_finer() -> None:
    envelope = compare.reference_envelope("fp32", 2.0)
    try:
        compare.judge_against("fp64")
        assert compare.noise_unit(0.0, 2.0, "fp32") == 0.0
        assert compare.noise_unit(1.0, 2.0, "fp32") == envelope  # capped: a broken path
        compare.judge_against("fp32")
        assert compare.noise_unit(0.0, 2.0, "fp32") == envelope
        assert compare.noise_unit(0.0, 2.0, "bf16") == 0.0  # float32 is finer than bf16
    finally:
        compare.judge_against("fp64")


def test_output_memo_is_bounded_least_recently_used_first(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """ModelCache.outputs holds at most OUTPUT_BYTES; the least recently used output goes first,
    and one asked for again after eviction is computed again (the same bits on CPU)."""
    from types import SimpleNamespace

    from conformance import running

    computed: list[str] = []

    def forward(loaded: object, batch: str) -> torch.Tensor:
        computed.append(batch)
        return torch.zeros(256, dtype=torch.float64)  # 2 KiB

    monkeypatch.setattr(running, "forward", forward)
    cache = running.ModelCache(tmp_path, "cpu")
    cache.OUTPUT_BYTES = 3 * 2048
    loaded = SimpleNamespace(zoo=SimpleNamespace(name="m"), variant=SimpleNamespace(id="eager"),
                             dtype="fp32", device="cpu")
    for batch in ("a", "b", "c", "d", "b"):  # "a" leaves at "d"; "b" is then used again
        cache.outputs(loaded, batch)
    assert computed == ["a", "b", "c", "d"]
    cache.outputs(loaded, "a")  # computed again; "c", now the least recently used, leaves
    cache.outputs(loaded, "d")
    cache.outputs(loaded, "c")
    assert computed == ["a", "b", "c", "d", "a", "c"]


class _RoundsTo(torch.nn.Linear):
    """A linear layer whose arithmetic keeps `dtype` only (the way bitsandbytes' CPU kernel casts
    to bfloat16 inside the op), holding float32 weights and returning float32."""

    def __init__(self, dtype: torch.dtype | None) -> None:
        super().__init__(16, 4)
        self.rounding = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rounding is None:
            return super().forward(x)
        return super().forward(x.to(self.rounding).float())


@pytest.mark.parametrize(("rounding", "kept"), [(None, "fp32"), (torch.float16, "fp16"),
                                                (torch.bfloat16, "bf16"),
                                                (torch.float8_e4m3fn, "below bf16")])
def test_kept_precision_is_measured_from_the_arithmetic(rounding: torch.dtype | None, kept: str) -> None:
    from conformance import arithmetic

    assert arithmetic.kept_precision(_RoundsTo(rounding), 16) == kept
    assert arithmetic.keeps(kept, "bf16") == (kept != "below bf16")
    assert arithmetic.keeps(kept, "fp32") == (kept == "fp32")


def test_invariance_rounds_at_the_measured_dtype_only_when_coarser() -> None:
    """A float32 request computed in bfloat16 is judged at bfloat16; one computed as asked, or
    finer, at its declared dtype; a model without 4-bit layers is never probed again."""
    from types import SimpleNamespace

    from conformance.arithmetic import effective_compute_dtype

    for measured, declared, expected in [("bf16", "fp32", "bf16"), ("fp32", "fp32", "fp32"),
                                         ("fp32", "bf16", "bf16"), ("below bf16", "fp16", "bf16"),
                                         ("", "fp32", "fp32")]:
        loaded = SimpleNamespace(kept_precision=measured, model=None)
        assert effective_compute_dtype(loaded, declared) == expected
    # a model that is no torch module (ONNX Runtime's) has no 4-bit layer to probe
    onnx = SimpleNamespace(kept_precision=None, model=object())
    assert effective_compute_dtype(onnx, "fp32") == "fp32" and onnx.kept_precision == ""


def _run_report(folder: Path, run: str, seed: int, outcomes: dict[str, str]) -> None:
    (folder / run).mkdir(parents=True)
    body = {"environment": {"hypothesis": {"seed": seed}, "versions": {"transformers": "5.0"}},
            "started": 0.0, "finished": 120.0,
            "results": [{"nodeid": k, "outcome": v} for k, v in outcomes.items()]}
    (folder / run / "report.json").write_text(json.dumps(body))


def test_false_alarm_ledger_adds_up_runs_from_other_checkouts(tmp_path: Path, capsys) -> None:
    from conformance.reporting import false_alarms

    ledger = tmp_path / "ledger.tsv"
    _run_report(tmp_path / "a", "0", 1, {"t[x]": "passed", "t[y]": "passed"})
    assert false_alarms.main([str(tmp_path / "a"), "--ledger", str(ledger)]) == 0
    # a later checkout has lost run 0's report; its run 1 fails one check
    _run_report(tmp_path / "b", "1", 7920, {"t[x]": "passed", "t[y]": "failed", "t[z]": "xfailed"})
    assert false_alarms.main([str(tmp_path / "b"), "--ledger", str(ledger)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == "2 runs, 3 passing test executions, 1 spurious failures"
    assert out[-1] == "  t[y]: failed in runs 1"
    rows = false_alarms.read_ledger(ledger)
    assert [(r["run"], r["seed"], r["xfailed"], r["minutes"]) for r in rows] == [
        ("0", "1", "0", "2.0"), ("1", "7920", "1", "2.0")]


def test_nested_hidden_states_are_a_verdict_not_a_crash() -> None:
    """BetterTransformer's encoder hands back the states between its layers packed: the option
    check names them, instead of raising on the NestedTensor when it indexes the real tokens."""
    from types import SimpleNamespace

    import torch

    from conformance.options import _judge_hidden_states

    padded = torch.zeros(2, 3, 4)
    packed = torch.nested.nested_tensor([torch.zeros(3, 4), torch.zeros(1, 4)])
    out = SimpleNamespace(hidden_states=(padded, packed, padded))
    config = SimpleNamespace(num_hidden_layers=2)
    ctx = SimpleNamespace(variant=SimpleNamespace(model=SimpleNamespace(config=config),
                                                  zoo=SimpleNamespace(kind="encoder")))
    problem, figures = _judge_hidden_states(out, ctx)
    assert problem is not None and "hidden states [1] as NestedTensors" in problem
    assert figures["nested_hidden_states"] == [1]


@pytest.mark.parametrize("name", ["t5", "whisper"])
def test_decoder_tokens_are_the_plain_calls_decoder_ids(name: str, tmp_path: Path) -> None:
    """loss_labels reads the decoder's tokens from `decoder_tokens`, without building Whisper's
    features; they must be the very ids the plain call gives the decoder."""
    from conformance import running, zoo
    from conformance.strategies import BatchSpec

    loaded = running.load(zoo.resolve(name, zoo.default_zoo()), variants.REGISTRY["eager"], "fp32", "cpu",
                          tmp_path)
    ids, mask = BatchSpec((5, 2, 7), "left", seed=3).materialize(loaded.vocab_size, loaded.pad_id)
    plain = running.with_decoder_inputs(loaded, running.plain_inputs(loaded, ids, mask))
    assert torch.equal(running.decoder_tokens(loaded, ids, mask), plain["decoder_input_ids"])
