"""The variant registry: one declarative record per optimized path under test.

A record says which claims (SPEC C01..C16) the variant verifies, what it needs, how it is
loaded (``from_pretrained`` kwargs), what happens after loading, the context its forward runs
in, the ops that prove its path ran, and its tolerance class. Test templates expand over it.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from conformance import tolerances
from conformance.claims import CLAIM_IDS
from conformance.compat import eager_experts, force_sdpa_backend, legacy_sdp_kernel
from conformance.fa4 import EntryProof
from conformance.needs import CURRENT_STACK, GPU_RUNNER, LEGACY_STACK, Needs
from conformance.probes import Proof

KINDS = frozenset({"decoder", "encoder", "seq2seq"})
# the kinds a record takes unless it says otherwise: an encoder-decoder (seq2seq) is opt-in, per
# record, for the paths verified on it (eager and the SDPA backends so far)
DEFAULT_KINDS = frozenset({"decoder", "encoder"})
KERNEL_CLASS = "kernel"  # the tolerance rule of every path that must compute the same function
HALF = frozenset({"fp16", "bf16"})

SDPA_OPS = ("aten::_scaled_dot_product*",)
EAGER_SOFTMAX = ("aten::_softmax",)


@dataclass(frozen=True)
class Distributed:
    """How a distributed variant shards: transformers' DistributedConfig over `world_size` ranks.

    `plan` names the model's plan it needs (tp_plan, ep_plan, pp_plan): a model without one is
    "not applicable". `replicated` loads without the config (a planted fault: the "parallel" model
    every rank holds whole); `worker_hook` ("module:function") runs on every rank after loading.
    """

    mode: str  # "tp" | "pp" | "ep"
    config: Mapping[str, Any]
    plan: str
    world_size: int = 2
    replicated: bool = False
    worker_hook: str = ""
    # "module:function" that registers this variant in a rank's process (a planted fault's
    # catalogue registers its variants only when pytest asks; the ranks are no pytest)
    registered_by: str = ""

    def load_kwargs(self) -> dict[str, Any]:
        if self.replicated:
            return {}
        from transformers.distributed import DistributedConfig

        return {"distributed_config": DistributedConfig(**self.config)}


@dataclass(frozen=True)
class Variant:
    id: str
    claims: tuple[str, ...]
    summary: str
    needs: Needs = field(default_factory=Needs)
    load_kwargs: Callable[[Any], dict[str, Any]] = lambda dtype: {}
    post_load: Callable[[Any], Any] | None = None
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    proof: Mapping[str, Proof] = field(default_factory=dict)  # model kind -> proof
    tolerance: str = KERNEL_CLASS  # or a quantization scheme of tolerances.QUANT
    kinds: frozenset[str] = DEFAULT_KINDS
    place_with_device_map: bool = False  # quantized loads place weights at load time
    reference: bool = False
    # load errors that are the library's documented refusal for this model: a skip, not a failure
    refusals: tuple[str, ...] = ()
    # forward errors that are the path's documented refusal of an input: a skip with the reason
    input_refusals: tuple[str, ...] = ()
    # why a row's output depends, by design, on the rest of the batch ("" = it must not); such a
    # variant's invariance properties are bounded by its scheme's tolerance, not rounding noise
    batch_dependent: str = ""
    # the dtype its kernels compute in, where lower than the run dtype (a float32 model whose 4-bit
    # layers compute in float16): its invariance properties are judged in that dtype's rounding
    compute_dtype: str = ""
    # round-trips (C07, C16): how a converting post_load is undone (None: nothing to undo), how the
    # model is saved (None: save_pretrained) and a step after reloading (None: from_pretrained only)
    reverse: Callable[[Any], Any] | None = None
    save: Callable[..., None] | None = None
    post_reload: Callable[[Any], Any] | None = None
    # a path with its own loading (None: from_pretrained with load_kwargs): called as
    # loader(source, kind, torch dtype, device, kwargs) and returns the model, placed
    loader: Callable[..., Any] | None = None
    # a model sharded over several processes by transformers itself (None: one process); such a
    # variant runs only in test_distributed.py, through conformance/distributed.py's launcher
    distributed: Distributed | None = None

    def __post_init__(self) -> None:
        """A record's claims, tolerance rule and proofs are checked where it is declared, so a
        typo is an import error naming the record, not a silently unjudged variant."""
        unknown = [claim for claim in self.claims if claim not in CLAIM_IDS]
        if unknown:
            raise ValueError(f"variant {self.id!r}: unknown claim ids {unknown} (SPEC.md: {CLAIM_IDS})")
        if self.tolerance != KERNEL_CLASS and self.tolerance not in tolerances.QUANT:
            raise ValueError(f"variant {self.id!r}: tolerance {self.tolerance!r} is neither "
                             f"{KERNEL_CLASS!r} nor a scheme of tolerances.QUANT {sorted(tolerances.QUANT)}")
        if not self.kinds or not self.kinds <= KINDS or not set(self.proof) <= KINDS:
            raise ValueError(f"variant {self.id!r}: kinds {sorted(self.kinds)} and proofs "
                             f"{sorted(self.proof)} must be model kinds of {sorted(KINDS)}")
        unproven = sorted(self.kinds - set(self.proof))
        if self.claims and unproven:  # only the golden runs (no claim) judge without a proof
            raise ValueError(f"variant {self.id!r}: no proof that its path ran on {unproven} models")

    @property
    def kernel_class(self) -> bool:
        """Judged like a kernel: K x the plain reference's error (tolerances.KERNEL); otherwise
        by its quantization scheme's own bound (tolerances.QUANT[tolerance])."""
        return self.tolerance == KERNEL_CLASS

    def proof_for(self, kind: str) -> Proof | None:
        return self.proof.get(kind)


# transformers' own refusal of an attention implementation for a model (e.g. bert has no SDPA
# before 4.41): the path does not exist there, which is a skip with that message, not a failure.
NO_SUCH_IMPLEMENTATION = ("does not support an attention implementation through",)


# bitsandbytes' CPU 4-bit kernel (AVX512-BF16 packed format) takes only layers whose out_features
# divide by its 32-row block (measured: an intermediate_size of 344 is refused; the shipped trained
# decoder uses 384 for this reason): the kernel's refusal of that shape, quoted in the skip.
BNB_4BIT_CPU_SHAPES = ("N must be divisible by block_n",)


def _attn(impl: str) -> Callable[[Any], dict[str, Any]]:
    return lambda dtype: {"attn_implementation": impl}


def _forced(backend: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    return lambda: force_sdpa_backend(backend)


def _both(proof: Proof) -> dict[str, Proof]:
    """The same proof on every kind of model (the kinds a record takes are its `kinds`)."""
    return dict.fromkeys(sorted(KINDS), proof)


def _bnb(compute: str | None = None, attn: str = "eager", **config: Any) -> Callable[[Any], dict[str, Any]]:
    """BitsAndBytesConfig kwargs; 4-bit computes in the run dtype unless `compute` names one."""

    def kwargs(dtype: Any) -> dict[str, Any]:
        import torch
        from transformers import BitsAndBytesConfig

        want = getattr(torch, compute) if compute else dtype
        extra = {"bnb_4bit_compute_dtype": want} if config.get("load_in_4bit") else {}
        return {"quantization_config": BitsAndBytesConfig(**config, **extra), "attn_implementation": attn}

    return kwargs


def _legacy_kwarg(**flags: Any) -> Callable[[Any], dict[str, Any]]:
    return lambda dtype: {**flags, "attn_implementation": "eager"}


def _to_bettertransformer(model: Any) -> Any:
    return model.to_bettertransformer()


def _reverse_bettertransformer(model: Any) -> Any:
    return model.reverse_bettertransformer()


def _guides_sdp_kernel(backend: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    return lambda: legacy_sdp_kernel(backend)


EAGER_PROOF = Proof(EAGER_SOFTMAX, forbid=SDPA_OPS, what="eager attention computes softmax itself")
SDPA_PROOF = Proof(SDPA_OPS, forbid=EAGER_SOFTMAX, what="any SDPA kernel")
MATH_PROOF = Proof(
    ("aten::_safe_softmax",),
    forbid=(
        "aten::_scaled_dot_product_flash*",
        "aten::_scaled_dot_product_efficient*",
        "aten::_scaled_dot_product_cudnn*",
    ),
    what="SDPA math backend (its softmax is _safe_softmax)",
)
FLASH_PROOF = Proof(
    ("aten::_scaled_dot_product_flash_attention*",), forbid=("aten::_safe_softmax",), what="SDPA flash kernel"
)
EFFICIENT_PROOF = Proof(
    ("aten::_scaled_dot_product_efficient_attention*",),
    forbid=("aten::_safe_softmax",),
    what="SDPA memory-efficient kernel",
)
CUDNN_PROOF = Proof(
    ("aten::_scaled_dot_product_cudnn_attention*",), forbid=("aten::_safe_softmax",), what="SDPA cuDNN kernel"
)
FA2_PROOF = Proof(("flash_attn::*",), forbid=EAGER_SOFTMAX + SDPA_OPS, what="flash-attn kernels")
# FA4's CuTe kernels are no torch ops: its proof counts calls of its forward entry (conformance/fa4.py)
FA4_PROOF = EntryProof(forbid=EAGER_SOFTMAX + SDPA_OPS, what="flash_attn.cute (FlashAttention-4) forward")
BNB_PROOF = Proof(("bitsandbytes::*",), minimum="quantized", what="one bitsandbytes op per quantized linear")


@dataclass(frozen=True)
class AllProofs:
    """Several paths that must all run in one forward (a quantized model with a forced kernel)."""

    parts: tuple[Proof, ...]

    def verdict(self, counter: Any, model: Any) -> tuple[str | None, dict[str, Any]]:
        figures: dict[str, Any] = {}
        for part in self.parts:
            problem, found = part.verdict(counter, model)
            for key, value in found.items():
                merged = figures.setdefault(key, {} if isinstance(value, dict) else value)
                if isinstance(value, dict):
                    merged.update(value)
            if problem:
                return problem, figures
        return None, figures


BT_PROOFS = {
    "encoder": Proof(
        ("aten::_transformer_encoder_layer_fwd",),
        forbid=EAGER_SOFTMAX,
        what="nn.TransformerEncoderLayer fast path",
    ),
    "decoder": Proof(SDPA_OPS, forbid=EAGER_SOFTMAX, what="BetterTransformer's SDPA attention"),
    # measured on 4.48.3 / optimum 1.27: BART's encoder layers become the fast path (2 calls), its
    # decoder attention SDPA (4); T5's attention layers all SDPA (6); no eager softmax left
    "seq2seq": Proof(("aten::_transformer_encoder_layer_fwd",) + SDPA_OPS, forbid=EAGER_SOFTMAX,
                     what="BetterTransformer's encoder fast path and SDPA attention"),
}

# transformers 4.48 rejects bitsandbytes on a CPU-only machine (its multi-backend check fails);
# 5.x is the first line verified to quantize on CPU with bitsandbytes >= 0.47.
BNB_ON_CPU = {"cpu": {"transformers": ">=5.0"}}
BNB_NEEDS = Needs(
    packages={"bitsandbytes": ">=0.47", "transformers": ">=4.36"}, packages_on=BNB_ON_CPU, where=CURRENT_STACK
)
LEGACY_BNB_KWARG = Needs(
    packages={"bitsandbytes": ">=0.47", "transformers": "<5"},
    packages_on=BNB_ON_CPU,
    where="the legacy stack on " + GPU_RUNNER,
)


def _quantized(
    vid: str, summary: str, needs: Needs, load_kwargs: Callable[[Any], dict[str, Any]], scheme: str,
    **record: Any,
) -> Variant:
    """A bitsandbytes record: what every quantized variant shares, derived from its scheme;
    `record` keywords (claims, kinds, proof, ...) state where it differs, in its declaration."""
    derived: dict[str, Any] = dict(
        claims=("C10",) if scheme == "int8" else ("C11",),
        proof=_both(BNB_PROOF),
        input_refusals=() if scheme == "int8" else BNB_4BIT_CPU_SHAPES,
        batch_dependent=LLM_INT8_BATCH_WIDE if scheme == "int8" else "",
    )
    return Variant(vid, summary=summary, needs=needs, load_kwargs=load_kwargs, tolerance=scheme,
                   place_with_device_map=True, **{**derived, **record})


# llm_int8_skip_modules patterns (transformers' match: prefix/regex at a module boundary, or a
# suffix) naming the MLP input projections across the zoo's architectures, plus lm_head: an
# explicit list replaces transformers' default skips, so the head must be named to stay unquantized.
BNB_SKIP_MODULES = (r".*\.mlp", r".*\.intermediate", r".*\.ffn", "fc1", "lm_head")
# the knobs on decoders (LLM.int8's and 4-bit's home; tiny-llama-trained gives real figures),
# except where a finding is on an encoder (measured: 10-30 s per knob variant per CPU run)
DECODERS = frozenset({"decoder"})
# knob variants run in half precision only: there a float32 compute dtype differs from the run
# dtype, and every check's cases stay few (a quantized variant costs ~10-50 s per run per dtype)
KNOB_DTYPES = ("a knob variant runs in half precision only (in fp32 a float32 compute dtype is the "
               "run dtype; one dtype keeps the run fast)")
KNOB_NEEDS = Needs(packages=BNB_NEEDS.packages, packages_on=BNB_ON_CPU, where=CURRENT_STACK,
                   dtypes={"cpu": frozenset({"bf16"}), "cuda": HALF}, dtype_note=KNOB_DTYPES)


# LLM.int8 (Dettmers et al. 2022) keeps in 16-bit the hidden dimensions where *any* token of the
# batch exceeds llm_int8_threshold (6.0): neighbours and pad tokens change which columns a row
# is computed with. Measured on the zoo: up to 2.4% of the logit scale between a row alone and
# padded (bert, fp32).
LLM_INT8_BATCH_WIDE = ("LLM.int8 picks its 16-bit outlier columns across the whole batch "
                       "(llm_int8_threshold), so a row's output depends on its neighbours")


# ONNX Runtime through Optimum (C15). optimum.onnxruntime comes with optimum<2.0 or, since 2.0,
# the optimum-onnx package, whose only release (0.1.0) needs transformers<4.58: on transformers
# 5.x neither can be installed. Optimum's export=True writes an fp32 graph.
ORT_WHERE = LEGACY_STACK + "; optimum-onnx 0.1, its Optimum 2 home, needs transformers<4.58"
ORT_PACKAGES = {"onnxruntime": ">=1.16", "onnx": "", "transformers": "<4.58"}
ORT_DTYPE_NOTE = "Optimum's export=True writes an fp32 graph (half precision is not this path)"


def _ort(vid: str, provider: str, summary: str, devices: frozenset[str], where: str,
         predicate: tuple[str, ...] = ()) -> Variant:
    """An ONNX Runtime record: export with Optimum, run a session on `provider`."""
    from conformance.paths import onnx_runtime

    return Variant(
        vid,
        ("C15",),
        summary,
        needs=Needs(packages=ORT_PACKAGES, devices=devices,
                    dtypes={kind: frozenset({"fp32"}) for kind in devices},
                    predicate=("optimum_onnxruntime", *predicate), where=where,
                    dtype_note=ORT_DTYPE_NOTE),
        load_kwargs=lambda dtype: {"provider": provider},
        loader=onnx_runtime.load,
        proof=_both(onnx_runtime.proof(provider)),
        refusals=onnx_runtime.EXPORT_REFUSALS,
        input_refusals=onnx_runtime.INPUT_REFUSALS,
        kinds=KINDS,
    )


# torch.compile: opt-in (slow to compile on CPU), and inductor's CPU kernels need a C++ compiler
COMPILE_NEEDS = dict(predicate=("compile_opted_in", "cxx_compiler"))


def _compiled(vid: str, summary: str, needs: Needs, max_graph_breaks: int = 0,
              **compile_args: Any) -> Variant:
    from conformance.paths import compiled

    return Variant(
        vid,
        ("EXT",),  # torch.compile is in the documentation set but none of SPEC's claims C01..C16
        summary,
        needs=needs,
        post_load=compiled.compile_forward(**compile_args),
        proof=_both(compiled.CompiledProof(max_graph_breaks=max_graph_breaks, what=summary)),
        refusals=(compiled.STATIC_REFUSAL,),
        kinds=frozenset({"decoder"}) if compile_args.get("static_cache") else DEFAULT_KINDS,
    )


def _forced_sdpa(vid: str, claims: tuple[str, ...], summary: str,
                 context: Callable[[], contextlib.AbstractContextManager[Any]], proof: Proof,
                 needs: Needs | None = None) -> Variant:
    """An SDPA model whose forward runs with one backend forced; its proof names that kernel, so a
    silent fallback to another backend fails (C08)."""
    return Variant(vid, claims, summary, needs=needs or Needs(), refusals=NO_SUCH_IMPLEMENTATION,
                   load_kwargs=_attn("sdpa"), context=context, proof=_both(proof), kinds=KINDS)


FA2_NEEDS = dict(
    devices=frozenset({"cuda"}),
    min_capability=(8, 0),
    dtypes={"cuda": HALF},
    predicate=("flash_attn_importable",),
    where=GPU_RUNNER,
)
# FlashAttention-4 (flash-attn-4, `flash_attn.cute`): pure-Python wheels, kernels JIT-compiled by
# the CuTe DSL; transformers 5.x takes it as attn_implementation="flash_attention_4" and checks
# for compute capability 9.0 (Hopper) or newer (modeling_flash_attention_utils, 5.24)
FA4_PACKAGES = {"flash-attn-4": ">=4.0.0b1", "transformers": ">=5.0"}
FA4_NEEDS = dict(
    devices=frozenset({"cuda"}),
    min_capability=(9, 0),
    dtypes={"cuda": HALF},
    predicate=("flash_attn_4_importable",),
    where=GPU_RUNNER + " of compute capability 9.0+ with flash-attn-4 (`gpu/run` carries it)",
)


# SDPA forced to each backend, by backend: registered as they are, and combined with each
# bitsandbytes format below (the combination takes the backend's proof and device needs)
FORCED_SDPA: dict[str, Variant] = {
    "math": _forced_sdpa("sdpa_math", ("C08",), "SDPA forced to the math backend", _forced("math"),
                         MATH_PROOF),
    "flash": _forced_sdpa("sdpa_flash", ("C08", "C09"), "SDPA forced to the flash kernel",
                          _forced("flash"), FLASH_PROOF, Needs(dtypes={"cuda": HALF})),
    "efficient": _forced_sdpa("sdpa_efficient", ("C08",), "SDPA forced to the memory-efficient kernel",
                              _forced("efficient"), EFFICIENT_PROOF,
                              Needs(devices=frozenset({"cuda"}), where=GPU_RUNNER)),
    "cudnn": _forced_sdpa("sdpa_cudnn", ("C08", "C09"), "SDPA forced to the cuDNN kernel",
                          _forced("cudnn"), CUDNN_PROOF,
                          Needs(packages={"torch": ">=2.5"}, devices=frozenset({"cuda"}),
                                min_capability=(8, 0), dtypes={"cuda": HALF}, where=GPU_RUNNER)),
}


COMBO_DTYPES = ("a combination runs in half precision only (the dtype the fast kernels are for; one "
                "dtype keeps the run fast)")


def _quantized_sdpa(scheme: str, backend: str) -> Variant:
    """A bitsandbytes model whose forward runs SDPA forced to one backend (C13: the optimizations
    combine); its proof needs the bitsandbytes ops and that kernel in one forward."""
    forced = FORCED_SDPA[backend]
    backend_needs = forced.needs  # its device needs; its dtypes give way to the knobs' one dtype
    config: dict[str, Any] = ({"load_in_8bit": True} if scheme == "int8"
                              else {"load_in_4bit": True, "bnb_4bit_quant_type": scheme})
    name = "LLM.int8" if scheme == "int8" else "4-bit NormalFloat"
    needs = Needs(packages={**BNB_NEEDS.packages, **backend_needs.packages}, packages_on=BNB_ON_CPU,
                  devices=backend_needs.devices, min_capability=backend_needs.min_capability,
                  dtypes=KNOB_NEEDS.dtypes, where=backend_needs.where or CURRENT_STACK,
                  dtype_note=COMBO_DTYPES)
    return _quantized(f"bnb_{scheme}+sdpa_{backend}", f"{name} with SDPA forced to the {backend} backend",
                      needs, _bnb(attn="sdpa", **config), scheme,
                      claims=("C10", "C08") if scheme == "int8" else ("C11", "C13"),
                      kinds=DECODERS, context=forced.context, refusals=NO_SUCH_IMPLEMENTATION,
                      proof=_both(AllProofs((BNB_PROOF, forced.proof["decoder"]))))


FA2_BNB_PACKAGES = {"bitsandbytes": ">=0.39", "flash-attn": ">=2.1", "transformers": ">=4.36"}


def _quantized_fa2(vid: str, summary: str, load_kwargs: Callable[[Any], dict[str, Any]],
                   scheme: str, needs: Needs | None = None, flash: Proof = FA2_PROOF) -> Variant:
    """FlashAttention over a bitsandbytes model (C04; C13 for 4-bit): both paths must run in one
    forward (FA2 by default; FA4 with its own needs and proof)."""
    return _quantized(vid, summary, needs or Needs(packages=FA2_BNB_PACKAGES, **FA2_NEEDS), load_kwargs,
                      scheme, claims=("C04", "C10") if scheme == "int8" else ("C04", "C11", "C13"),
                      kinds=DECODERS, refusals=NO_SUCH_IMPLEMENTATION,
                      proof={"decoder": AllProofs((BNB_PROOF, flash))})


FA4_BNB_NEEDS = Needs(packages={**FA4_PACKAGES, "bitsandbytes": ">=0.47"}, **FA4_NEEDS)


# optimum's refusals of a model BetterTransformer does not cover
BT_REFUSALS = (
    "not yet supported to be used with BetterTransformer",
    "supports natively BetterTransformer optimizations",
)


# Distributed inference (C12, C14): transformers 5.x shards the model itself over torch.distributed
# (DistributedConfig: tp_size, ep_size, pp_size), gloo on CPU ranks, nccl on GPUs. The proof is
# the plan's collectives in the very forward whose outputs are judged (test_distributed.py also
# checks the shards, their contents and the bytes per rank against the plan).
ALL_REDUCE_OPS = ("c10d::allreduce_", "_c10d_functional::all_reduce*")
ALL_GATHER_OPS = ("c10d::allgather*", "c10d::_allgather*", "_c10d_functional::all_gather*")
ALL_TO_ALL_OPS = ("c10d::alltoall*", "_c10d_functional::all_to_all*")
P2P_OPS = ("c10d::send", "c10d::recv_*", "c10d::broadcast_")
COLLECTIVE_OPS = ALL_REDUCE_OPS + ALL_GATHER_OPS + ALL_TO_ALL_OPS + P2P_OPS
TP_PROOF = Proof(ALL_REDUCE_OPS, minimum="layers",
                 what="a row-parallel all-reduce per layer at least (the plan's count is checked too)")
PP_PROOF = Proof(P2P_OPS, minimum=1, what="stage-to-stage send/recv and the logits' broadcast")
# DistributedConfig exists with tp_size/pp_size/ep_size in transformers 5.x (verified on 5.24);
# earlier 5.x ship it with only enable_expert_parallel (5.1-5.11 swept): the predicates
# distributed_tp/_ep/_pp (needs.py) make those variants a skip there, not a TypeError per test
DIST_NEEDS = dict(packages={"transformers": ">=5.0", "torch": ">=2.5"},
                  dtypes={"cpu": frozenset({"fp32"})}, where=CURRENT_STACK,
                  dtype_note="distributed variants run fp32 on CPU ranks (gloo; one dtype keeps the "
                             "launches few); half precision on GPUs (nccl)")


def _distributed(vid: str, summary: str, dist: Distributed, proof: Any, attn: str = "eager",
                 context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                 needs: Needs | None = None, quantization: Callable[[Any], dict[str, Any]] | None = None,
                 **record: Any) -> Variant:
    """A model transformers shards over `dist.world_size` processes; `quantization` (a _bnb(...)
    config) quantizes it too, and `record` keywords state where a record differs from its family."""
    base = quantization or _attn(attn)
    return Variant(
        vid, summary=summary, distributed=dist,
        needs=needs or Needs(**DIST_NEEDS, predicate=(f"distributed_{dist.mode}",)),
        load_kwargs=lambda dtype: {**dist.load_kwargs(), **base(dtype)},
        context=context, proof=_both(proof), kinds=DECODERS,
        refusals=("has no `tp_plan`", "has no `ep_plan`", "has no `pp_plan`",
                  *(NO_SUCH_IMPLEMENTATION if attn != "eager" else ())),
        **{"claims": ("C12", "C14"), **record},
    )


def _tp_sdpa(backend: str) -> Variant:
    forced = FORCED_SDPA[backend]
    needs = forced.needs
    return _distributed(
        f"tp2+sdpa_{backend}", f"tensor parallel over 2 ranks, SDPA forced to the {backend} backend",
        TP2, AllProofs((TP_PROOF, forced.proof["decoder"])), attn="sdpa", context=forced.context,
        needs=Needs(packages={**DIST_NEEDS["packages"], **needs.packages}, devices=needs.devices,
                    min_capability=needs.min_capability,
                    dtypes={"cpu": frozenset({"fp32"}), **({"cuda": needs.dtypes["cuda"]}
                                                           if "cuda" in needs.dtypes else {})},
                    where=needs.where or CURRENT_STACK, dtype_note=DIST_NEEDS["dtype_note"],
                    predicate=("distributed_tp", *needs.predicate)))


TP2 = Distributed("tp", {"tp_size": 2}, "tp_plan")
# expert parallel: transformers 5.24 lays experts over tp x fsdp ranks (ep_size must divide
# fsdp_size * tp_size), so ep over 2 ranks comes with tp_size=2; the experts are sharded by expert
EP2 = Distributed("ep", {"tp_size": 2, "ep_size": 2}, "ep_plan")
PP2 = Distributed("pp", {"pp_size": 2}, "pp_plan")
DISTRIBUTED_VARIANTS = [
    _distributed("tp2", "tensor parallel over 2 ranks: DistributedConfig(tp_size=2), the model's tp_plan",
                 TP2, TP_PROOF),
    *(_tp_sdpa(backend) for backend in FORCED_SDPA),
    _distributed("ep2", "expert parallel over 2 ranks: DistributedConfig(tp_size=2, ep_size=2), experts "
                 "sharded by expert", EP2, TP_PROOF),
    _distributed("pp2", "pipeline parallel over 2 ranks: DistributedConfig(pp_size=2), layers split evenly",
                 PP2, PP_PROOF),
]

# Shardings transformers may not support (issue 19's bad input): each must run and give its own
# bound's answer, with its path proven, or be refused at load in one line that names the cause.
# Kept out of REGISTRY, where every distributed check would expand over them: the one check
# test_distributed_limits runs each once, on the run's first decoder with a tp_plan.
TP3 = Distributed("tp", {"tp_size": 3}, "tp_plan", world_size=3)
TP_BNB_NEEDS = Needs(packages={**DIST_NEEDS["packages"], "bitsandbytes": ">=0.47"}, packages_on=BNB_ON_CPU,
                     dtypes=DIST_NEEDS["dtypes"], where=CURRENT_STACK, dtype_note=DIST_NEEDS["dtype_note"],
                     predicate=("distributed_tp",))
SHARDING_LIMITS: dict[str, Variant] = {v.id: v for v in [
    _distributed("tp3", "tensor parallel over 3 ranks, a world size that divides neither the zoo's 4 "
                 "attention heads nor its KV heads", TP3, TP_PROOF),
    _distributed("tp2+bnb_int8", "tensor parallel over 2 ranks of an LLM.int8 model (DistributedConfig "
                 "with BitsAndBytesConfig(load_in_8bit=True))", TP2, AllProofs((TP_PROOF, BNB_PROOF)),
                 needs=TP_BNB_NEEDS, quantization=_bnb(load_in_8bit=True), claims=("C10", "C12", "C14"),
                 tolerance="int8", batch_dependent=LLM_INT8_BATCH_WIDE),
    _distributed("tp2+bnb_nf4", "tensor parallel over 2 ranks of a 4-bit NormalFloat model "
                 "(DistributedConfig with BitsAndBytesConfig(load_in_4bit=True))", TP2,
                 AllProofs((TP_PROOF, BNB_PROOF)), needs=TP_BNB_NEEDS,
                 quantization=_bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                 claims=("C11", "C12", "C14"), tolerance="nf4", input_refusals=BNB_4BIT_CPU_SHAPES),
]}


REGISTRY: dict[str, Variant] = {
    v.id: v
    for v in [
        Variant(
            "eager",
            ("REF",),
            "plain attention: the reference every claim is measured against",
            load_kwargs=_attn("eager"),
            proof=_both(EAGER_PROOF),
            reference=True,
            kinds=KINDS,
        ),
        Variant(
            "sdpa",
            ("C08",),
            "SDPA with torch's own backend choice",
            load_kwargs=_attn("sdpa"),
            refusals=NO_SUCH_IMPLEMENTATION,
            proof=_both(SDPA_PROOF),
            kinds=KINDS,
        ),
        *FORCED_SDPA.values(),
        _forced_sdpa("sdp_kernel_flash", ("C08", "C09"),
                     "the guides' spelling: torch.backends.cuda.sdp_kernel(enable_flash=True, ...)",
                     _guides_sdp_kernel("flash"), FLASH_PROOF,
                     Needs(dtypes={"cuda": HALF}, predicate=("legacy_sdp_kernel",))),
        Variant(
            "fa2",
            ("C01", "C03"),
            "FlashAttention-2 via attn_implementation",
            needs=Needs(packages={"flash-attn": ">=2.1", "transformers": ">=4.36"}, **FA2_NEEDS),
            load_kwargs=_attn("flash_attention_2"),
            refusals=NO_SUCH_IMPLEMENTATION,
            proof={"decoder": FA2_PROOF},
            kinds=frozenset({"decoder"}),
        ),
        Variant(
            "fa4",
            ("C01", "C03"),
            "FlashAttention-4 (flash_attn.cute) via attn_implementation=\"flash_attention_4\"",
            needs=Needs(packages=FA4_PACKAGES, **FA4_NEEDS),
            load_kwargs=_attn("flash_attention_4"),
            refusals=NO_SUCH_IMPLEMENTATION,
            proof={"decoder": FA4_PROOF},
            kinds=frozenset({"decoder"}),
        ),
        Variant(
            "fa2_kwarg",
            ("C01", "C03"),
            "the guides' spelling: use_flash_attention_2=True",
            needs=Needs(packages={"flash-attn": ">=2.1", "transformers": "<4.53"}, **FA2_NEEDS),
            load_kwargs=lambda dtype: {"use_flash_attention_2": True},
            proof={"decoder": FA2_PROOF},
            kinds=frozenset({"decoder"}),
        ),
        Variant(
            "bettertransformer",
            ("C06",),
            "optimum BetterTransformer: model.to_bettertransformer()",
            needs=Needs(packages={"transformers": "<4.49", "optimum": "<2.0"}, where=LEGACY_STACK),
            load_kwargs=_attn("eager"),
            post_load=_to_bettertransformer,
            reverse=_reverse_bettertransformer,
            proof=BT_PROOFS,
            kinds=KINDS,
            refusals=BT_REFUSALS,
            # the nested-tensor encoder fast path takes right padding only
            input_refusals=("Mask must be left-aligned without gaps",),
        ),
        _quantized("bnb_int8", "bitsandbytes LLM.int8 via BitsAndBytesConfig(load_in_8bit=True)",
                   BNB_NEEDS, _bnb(load_in_8bit=True), "int8", kinds=KINDS),
        _quantized("bnb_nf4", "bitsandbytes 4-bit NormalFloat, compute dtype = run dtype",
                   BNB_NEEDS, _bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4"), "nf4", kinds=KINDS),
        _quantized("bnb_fp4", "bitsandbytes 4-bit float, compute dtype = run dtype",
                   BNB_NEEDS, _bnb(load_in_4bit=True, bnb_4bit_quant_type="fp4"), "fp4", kinds=KINDS),
        _quantized("bnb_nf4_dq", "4-bit NormalFloat with double quantization of the scales",
                   BNB_NEEDS, _bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True), "nf4", kinds=KINDS),
        # the schemes' knobs (issue 6): each a variant id, not a loop inside a check; one dtype
        # per device (KNOB_NEEDS) keeps the default run fast: the knob is what they add
        _quantized("bnb_int8_no_outliers", "LLM.int8 with llm_int8_threshold=0.0: no 16-bit outlier "
                   "path", KNOB_NEEDS, _bnb(load_in_8bit=True, llm_int8_threshold=0.0), "int8",
                   # encoders only: MiniLM is where switching the outlier path off measurably costs
                   # quality, and int8 cases are the suite's slowest (decoder figures measured once,
                   # docs/checks.md "Quantization")
                   kinds=frozenset({"encoder"})),
        _quantized("bnb_int8_skip", "LLM.int8 with llm_int8_skip_modules: MLP input projections and "
                   "lm_head kept in the run dtype", KNOB_NEEDS,
                   _bnb(load_in_8bit=True, llm_int8_skip_modules=list(BNB_SKIP_MODULES)), "int8",
                   kinds=DECODERS),
        _quantized("bnb_nf4_c32", "4-bit NormalFloat, bnb_4bit_compute_dtype=float32 while the "
                   "unquantized weights stay in the run dtype", KNOB_NEEDS,
                   _bnb("float32", load_in_4bit=True, bnb_4bit_quant_type="nf4"), "nf4", kinds=DECODERS),
        # the guides' own 4-bit configuration: BitsAndBytesConfig(load_in_4bit=True,
        # bnb_4bit_compute_dtype=torch.float16) on a model loaded in float32
        _quantized("bnb_nf4_c16", "4-bit NormalFloat, bnb_4bit_compute_dtype=float16 on a float32 model "
                   "(the guides' configuration)",
                   Needs(packages=BNB_NEEDS.packages, packages_on=BNB_ON_CPU, where=CURRENT_STACK,
                         dtypes={"cpu": frozenset({"fp32"}), "cuda": frozenset({"fp32"})},
                         dtype_note="the guides' configuration: a float32 model whose 4-bit layers "
                                    "compute in float16"),
                   _bnb("float16", load_in_4bit=True, bnb_4bit_quant_type="nf4"), "nf4",
                   kinds=DECODERS, compute_dtype="fp16"),
        # the guides' combination (a 4-bit model with SDPA forced to the flash kernel), for each
        # bitsandbytes format and each forced backend; the device's own ones run
        *(_quantized_sdpa(scheme, backend) for scheme in ("int8", "nf4") for backend in FORCED_SDPA),
        # C04/C13 on GPU: FA2 over a quantized model (the proof needs both paths in one forward)
        _quantized_fa2("bnb_int8+fa2", "LLM.int8 with attn_implementation=\"flash_attention_2\"",
                       _bnb(attn="flash_attention_2", load_in_8bit=True), "int8"),
        _quantized_fa2("bnb_nf4+fa2", "4-bit NormalFloat with attn_implementation=\"flash_attention_2\"",
                       _bnb(attn="flash_attention_2", load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                       "nf4"),
        _quantized_fa2("bnb_int8+fa4", "LLM.int8 with attn_implementation=\"flash_attention_4\"",
                       _bnb(attn="flash_attention_4", load_in_8bit=True), "int8", FA4_BNB_NEEDS, FA4_PROOF),
        _quantized_fa2("bnb_nf4+fa4", "4-bit NormalFloat with attn_implementation=\"flash_attention_4\"",
                       _bnb(attn="flash_attention_4", load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                       "nf4", FA4_BNB_NEEDS, FA4_PROOF),
        # the guides' own spelling of C04 (transformers < 4.53)
        _quantized_fa2("load_in_8bit+fa2_kwarg", "the guides' spelling: from_pretrained("
                       "load_in_8bit=True, use_flash_attention_2=True)",
                       lambda dtype: {"load_in_8bit": True, "use_flash_attention_2": True}, "int8",
                       Needs(packages={**FA2_BNB_PACKAGES, "transformers": "<4.53"}, **FA2_NEEDS)),
        # the guides' "advanced usage" (C13 as written): 4-bit (fp4, BitsAndBytesConfig's default)
        # + BetterTransformer + SDPA forced to flash; transformers 4.48 quantizes on GPU only
        _quantized("bnb_fp4+bettertransformer", "4-bit float + to_bettertransformer() with SDPA forced "
                   "to the flash kernel (the guides' advanced usage)",
                   Needs(packages={**LEGACY_BNB_KWARG.packages, "optimum": "<2.0"}, packages_on=BNB_ON_CPU,
                         dtypes={"cuda": HALF}, where=LEGACY_BNB_KWARG.where),
                   _bnb(load_in_4bit=True, bnb_4bit_quant_type="fp4"), "fp4",
                   claims=("C06", "C11", "C13"), kinds=DECODERS, post_load=_to_bettertransformer,
                   context=_forced("flash"), refusals=BT_REFUSALS,
                   proof={"decoder": AllProofs((BNB_PROOF, FLASH_PROOF))}),
        _quantized("load_in_8bit", "the guides' spelling: from_pretrained(load_in_8bit=True)",
                   LEGACY_BNB_KWARG, _legacy_kwarg(load_in_8bit=True), "int8"),
        _quantized("load_in_4bit", "the guides' spelling: from_pretrained(load_in_4bit=True)",
                   LEGACY_BNB_KWARG, _legacy_kwarg(load_in_4bit=True), "fp4"),
        _ort("ort_cpu", "CPUExecutionProvider",
             "ONNX Runtime via Optimum: ORTModelFor*.from_pretrained(export=True), CPU provider",
             frozenset({"cpu"}), ORT_WHERE),
        _ort("ort_cuda", "CUDAExecutionProvider",
             "ONNX Runtime via Optimum on the CUDA execution provider (the guides' GPU path)",
             frozenset({"cuda"}), ORT_WHERE + ", on " + GPU_RUNNER + " with onnxruntime-gpu",
             predicate=("ort_cuda_provider",)),
        _ort("ort_tensorrt", "TensorrtExecutionProvider",
             "ONNX Runtime via Optimum on the TensorRT execution provider",
             frozenset({"cuda"}), ORT_WHERE + ", on " + GPU_RUNNER + " with onnxruntime-gpu + TensorRT",
             predicate=("ort_tensorrt_provider",)),
        _compiled("compile", "torch.compile(model.forward), default mode (inductor)",
                  Needs(packages={"torch": ">=2.1"}, **COMPILE_NEEDS)),
        _compiled("compile_reduce_overhead",
                  "torch.compile(model.forward, mode='reduce-overhead'): CUDA graphs",
                  Needs(packages={"torch": ">=2.1"}, devices=frozenset({"cuda"}), where=GPU_RUNNER,
                        **COMPILE_NEEDS),
                  mode="reduce-overhead"),
        _compiled("compile_static",
                  "static KV cache + torch.compile(model.forward, fullgraph=True) (reduce-overhead "
                  "on GPU)",
                  Needs(packages={"torch": ">=2.1", "transformers": ">=4.38"}, **COMPILE_NEEDS),
                  mode="auto", fullgraph=True, static_cache=True),
        *DISTRIBUTED_VARIANTS,
    ]
}

REFERENCE = "eager"

@contextlib.contextmanager
def _float64_throughout() -> Any:
    """The golden run's numerics: torch's default dtype is float64 while it runs (transformers'
    older mask builders allocate with the default dtype and overflow converting float64's minimum
    otherwise: "value cannot be converted to type float without overflow"), and no float32 island
    (eager's softmax asked for float32, RMSNorm's upcast, RoPE's ``.float()``): float64 tensors
    stay float64 (conformance/float64.py), so no float32 rounding is in the float64 judge."""
    import torch

    from conformance import float64

    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with float64.kept():
            yield
    finally:
        torch.set_default_dtype(before)


@contextlib.contextmanager
def _full_precision_on_device() -> Any:
    """A float32 golden run on a GPU: no TF32, no reduced-precision reductions."""
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
             torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
         torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction) = saved


# The golden run is the plain path: eager attention in float64, each row alone and unpadded
# (checks.golden_outputs). Nothing of an optimized path's integration is in it: not SDPA's mask
# builders, cache handling or option handling, and no padding mask at all, so a bug there cannot
# be in both the variant and its judge. Eager cannot be "refused": every model has it, so a
# golden load or forward that fails is a failure naming the model, never a fallback.
GOLDEN = Variant(
    "golden",
    (),
    "eager attention in float64, each row alone and unpadded (float32 on the device for half "
    "dtypes on a GPU)",
    load_kwargs=lambda dtype: {"attn_implementation": "eager", **eager_experts()},
    context=_float64_throughout,
)
GOLDEN_DEVICE = Variant(
    "golden_device", (), "eager attention in float32 on the device, TF32 and reduced-precision "
    "reductions off", load_kwargs=_attn("eager"), context=_full_precision_on_device,
)


def select(patterns: list[str] | None) -> tuple[list[Variant], list[str]]:
    """Variants matching any glob (all when none), and the patterns that matched nothing."""
    if not patterns:
        return list(REGISTRY.values()), []
    unmatched = [p for p in patterns if not fnmatch.filter(REGISTRY, p)]
    chosen = [v for v in REGISTRY.values() if any(fnmatch.fnmatchcase(v.id, p) for p in patterns)]
    return chosen, unmatched
