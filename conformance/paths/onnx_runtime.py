"""ONNX Runtime through Optimum (C15): export, a session on the requested execution provider,
and the proof that the session, not torch, computed the outputs.

The guides' path is ``ORTModelFor....from_pretrained(..., export=True, provider=...)``: Optimum
exports the checkpoint to ONNX in a temporary directory and opens an InferenceSession on it.
Optimum < 2.0 ships it as ``optimum.onnxruntime``; since 2.0 it lives in the ``optimum-onnx``
package under the same module name (its only release, 0.1.0, needs transformers < 4.58).

Proof of path: every ``InferenceSession.run`` / ``run_with_iobinding`` of a loaded model is
recorded as a pseudo-op ``onnxruntime::run@<provider that ran>`` in the active op counter, so
the registry's op-count proof (conformance/probes.py) applies unchanged: the session must run
on the requested provider (a silent CPU fallback shows as ``run@CPUExecutionProvider``) and torch
must not compute the model (no matmul, softmax or attention op is dispatched).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from conformance.probes import OpCounter, Proof

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
RUN_OP = "onnxruntime::run@"

# what torch would dispatch if it computed the model itself (the exported graph replaces all of it)
TORCH_COMPUTE = (
    "aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear", "aten::embedding",
    "aten::_softmax", "aten::_safe_softmax", "aten::*scaled_dot_product*",
)

# Optimum's refusal to export an architecture it has no ONNX configuration for
EXPORT_REFUSALS = ("is not supported yet", "custom or unsupported architecture")
# Optimum's clear refusals of an input without an attention mask: the graph takes one as input
# ("Input attention_mask is required by model but not provided"), or positions come from it (opt)
INPUT_REFUSALS = ("is required by model but not provided",
                  "Please provide position_ids or attention_mask",
                  # an encoder-decoder's decoder_with_past graph is exported for one new token per
                  # cached step (what generate feeds it): a multi-token cached chunk is refused
                  "Got invalid dimensions for input: input_ids")


class OrtProof(Proof):
    """The op-count proof, with the sessions that did run named when the wanted one did not."""

    def verdict(self, counter: OpCounter, model: Any) -> tuple[str | None, dict[str, Any]]:
        problem, figures = super().verdict(counter, model)
        runs = counter.matching((RUN_OP + "*",))
        figures["session_runs"] = runs
        figures["session_providers"] = providers(model)
        if problem:
            problem += f"; ONNX Runtime runs seen: {runs or 'none'}, session providers {providers(model)}"
        return problem, figures


def proof(provider: str) -> OrtProof:
    return OrtProof((RUN_OP + provider,), forbid=TORCH_COMPUTE, minimum=1,
                    what=f"an ONNX Runtime session on {provider}, no torch compute")


def ort_class(kind: str, source: Any) -> Any:
    """ORTModelForCausalLM for decoders; for encoder-decoders ORTModelForSeq2SeqLM, or
    ORTModelForSpeechSeq2Seq where the checkpoint's config is a speech model (Whisper);
    ORTModelForFeatureExtraction (last_hidden_state) for encoders."""
    with exporter_compat(), _quiet():
        from optimum.onnxruntime import (
            ORTModelForCausalLM,
            ORTModelForFeatureExtraction,
            ORTModelForSeq2SeqLM,
            ORTModelForSpeechSeq2Seq,
        )

    if kind == "seq2seq":
        from transformers import AutoConfig

        from conformance.zoo import speech_encoder

        speech = speech_encoder(AutoConfig.from_pretrained(source))
        return ORTModelForSpeechSeq2Seq if speech else ORTModelForSeq2SeqLM
    return ORTModelForCausalLM if kind == "decoder" else ORTModelForFeatureExtraction


@contextlib.contextmanager
def exporter_compat() -> Iterator[None]:
    """Let optimum 1.x's exporter run on torch >= 2.9, where two things it relies on changed.

    - ``torch.onnx.symbolic_opset14`` became a shim re-exporting only public names, and optimum
      1.27's model patcher imports private helpers (``_attention_scale``, ...) from it: they are
      aliased from their new home, ``torch.onnx._internal.torchscript_exporter``.
    - ``torch.onnx.export`` defaults to ``dynamo=True`` (needs onnxscript, ignores
      ``dynamic_axes``): the TorchScript exporter optimum was written for is asked for explicitly.
    Both are no-ops where torch still has the old behaviour (and on optimum-onnx).
    """
    import torch.onnx

    try:
        import torch.onnx.symbolic_opset14 as public
        from torch.onnx._internal.torchscript_exporter import symbolic_opset14 as moved
    except ImportError:
        moved = None
    if moved is not None:
        for name in ("_attention_scale", "_causal_attention_mask", "_onnx_symbolic", "_type_utils",
                     "jit_utils", "symbolic_helper"):
            if not hasattr(public, name) and hasattr(moved, name):
                setattr(public, name, getattr(moved, name))
    original = torch.onnx.export
    import inspect

    if "dynamo" not in inspect.signature(original).parameters:
        yield
        return

    @functools.wraps(original)
    def torchscript_export(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("dynamo", False)
        return original(*args, **kwargs)

    torch.onnx.export = torchscript_export
    try:
        yield
    finally:
        torch.onnx.export = original


def provider_options(provider: str, device: str) -> dict[str, Any]:
    if provider in (CUDA, TENSORRT):
        index = device.partition(":")[2]
        return {"device_id": int(index) if index else 0}
    return {}


# exports made in this process, by (source, kind): every check module loads each model again (the
# model cache keeps one model at a time), and an export costs 0.3-5 s where a reload costs 0.1-0.5
_EXPORTS: dict[tuple[str, str], Any] = {}


def export(source: str, kind: str, provider: str, device: str) -> Any:
    """The guides' call: export to ONNX in a temporary directory, open a session on `provider`.

    The first export of a checkpoint in a process is kept (saved with save_pretrained); later
    loads open that saved graph on the requested provider. test_onnx_save_reload checks that such
    a reload is bitwise the exported model.
    """
    import tempfile

    key = (str(source), kind)
    if key in _EXPORTS:
        return reload(Path(_EXPORTS[key].name), kind, provider, device)
    cls = ort_class(kind, source)
    with exporter_compat(), _quiet():
        model = cls.from_pretrained(source, export=True, provider=provider,
                                    provider_options=provider_options(provider, device))
    kept = tempfile.TemporaryDirectory(prefix="conformance-onnx-")
    model.save_pretrained(kept.name)
    _EXPORTS[key] = kept
    return instrument(model)


def load(source: str, kind: str, dtype: Any, device: str, kwargs: dict[str, Any]) -> Any:
    """The registry's `loader`: exports with the provider named in the variant's load kwargs."""
    return export(source, kind, kwargs["provider"], device)


def reload(directory: Path, kind: str, provider: str, device: str) -> Any:
    """An exported model saved with save_pretrained, opened again (no export) on `provider`."""
    cls = ort_class(kind, directory)
    with _quiet():
        again = cls.from_pretrained(directory, export=False, provider=provider,
                                    provider_options=provider_options(provider, device))
    return instrument(again)


def sessions(model: Any) -> list[Any]:
    """The InferenceSession(s) an ORTModel runs (``session``; ``model`` in older Optimum)."""
    from onnxruntime import InferenceSession

    found: list[Any] = []
    for name in ("session", "model", "decoder", "encoder"):
        value = getattr(model, name, None)
        value = getattr(value, "session", value)
        if isinstance(value, InferenceSession) and all(value is not s for s in found):
            found.append(value)
    return found


def providers(model: Any) -> list[str]:
    """The execution providers of the model's session(s), in priority order."""
    out: list[str] = []
    for session in sessions(model):
        out += [p for p in session.get_providers() if p not in out]
    return out


def instrument(model: Any) -> Any:
    """Record each session run, with the provider it ran on, into the active op counter."""
    for session in sessions(model):
        if getattr(session, "_conformance_counted", False):
            continue
        for name in ("run", "run_with_iobinding"):
            setattr(session, name, _counted(session, getattr(session, name)))
        session._conformance_counted = True
    return model


def _counted(session: Any, run: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(run)
    def counted(*args: Any, **kwargs: Any) -> Any:
        record(RUN_OP + session.get_providers()[0])
        return run(*args, **kwargs)

    return counted


def record(pseudo_op: str) -> None:
    """Count `pseudo_op` in every OpCounter active on this thread (none: nothing to count)."""
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    except ImportError:  # pragma: no cover - torch without the helper: the proof sees 0 runs
        return
    for mode in _get_current_dispatch_mode_stack():
        if isinstance(mode, OpCounter):
            mode.counts[pseudo_op] += 1


def model_file(model: Any) -> Path:
    return Path(sessions(model)[0]._model_path)


def initializer_dtypes(model: Any) -> list[Any]:
    """The torch dtypes of the exported graph's weights (its initializers): what an exported model
    holds instead of parameters, for the dtype check."""
    import onnx
    import torch

    table = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
             onnx.TensorProto.BFLOAT16: torch.bfloat16, onnx.TensorProto.DOUBLE: torch.float64}
    graph = onnx.load(str(model_file(model)), load_external_data=False).graph
    return [table[t.data_type] for t in graph.initializer if t.data_type in table]


def available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def provider_missing(provider: str) -> str | None:
    """Why `provider` cannot be asked for with this onnxruntime build, or None."""
    try:
        found = available_providers()
    except ImportError:
        return "needs onnxruntime (not installed)"
    if provider in found:
        return None
    return f"needs onnxruntime with {provider} (this build has: {', '.join(found)})"


def optimum_ort_missing() -> str | None:
    """Why Optimum's ONNX Runtime module cannot be imported here, or None (without importing it)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("optimum.onnxruntime")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return "needs optimum.onnxruntime (optimum<2.0, or the optimum-onnx package)"
    return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's tracer warnings and Optimum's notices are not the check's business."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("optimum", "torch.onnx", "onnxruntime")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
