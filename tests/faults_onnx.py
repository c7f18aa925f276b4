"""Planted faults for the ONNX Runtime (C15) and torch.compile variants, registered only for the
self-tests (``-p faults_onnx``). Same catalogue format as tests/faults.py: each names the check
that must catch it, the message that check must give, and its healthy twin.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from faults import Fault, _fault

from conformance.paths import onnx_runtime
from conformance.variants import REGISTRY, _both


def _drop_attention_mask(path: Path) -> None:
    """Rewrite an exported graph so that `attention_mask` is no longer an input but a constant of
    ones shaped like input_ids: Optimum then stops feeding the mask, silently."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    kept = [i for i in graph.input if i.name != "attention_mask"]
    assert len(kept) < len(graph.input), "the export has no attention_mask input to drop"
    del graph.input[:]
    graph.input.extend(kept)
    one = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    graph.node.insert(0, helper.make_node("ConstantOfShape", ["fault_ids_shape"], ["attention_mask"],
                                          value=one))
    graph.node.insert(0, helper.make_node("Shape", ["input_ids"], ["fault_ids_shape"]))
    onnx.save(model, str(path))


def _mask_dropped_loader(source: str, kind: str, dtype: Any, device: str, kwargs: dict[str, Any]) -> Any:
    exported = onnx_runtime.export(source, kind, kwargs["provider"], device)
    keep = tempfile.TemporaryDirectory(prefix="fault-onnx-")
    folder = Path(keep.name) / "model"
    shutil.copytree(onnx_runtime.model_file(exported).parent, folder)
    _drop_attention_mask(folder / onnx_runtime.model_file(exported).name)
    model = onnx_runtime.reload(folder, kind, kwargs["provider"], device)
    model._fault_folder = keep  # the folder lives as long as the model
    return model


def _cpu_whatever_was_asked(source: str, kind: str, dtype: Any, device: str,
                            kwargs: dict[str, Any]) -> Any:
    """The provider that was asked for fails to initialise and the session quietly takes the CPU."""
    return onnx_runtime.export(source, kind, onnx_runtime.CPU, "cpu")


def _nudge_floats(path: Path) -> None:
    """Every floating-point weight one ulp up: invisible to any tolerance, not to a bitwise check."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind == "f":
            tensor.CopyFrom(numpy_helper.from_array(np.nextafter(array, np.inf).astype(array.dtype),
                                                    tensor.name))
    onnx.save(model, str(path))


def _save_nudged_loader(source: str, kind: str, dtype: Any, device: str, kwargs: dict[str, Any]) -> Any:
    model = onnx_runtime.export(source, kind, kwargs["provider"], device)
    save = model._save_pretrained

    def nudged(directory: Any) -> None:
        save(directory)
        _nudge_floats(Path(directory) / onnx_runtime.model_file(model).name)

    model._save_pretrained = nudged
    return model


def _compile_skipped(model: Any) -> Any:
    """The compiled variant's frame is excluded from compilation: eager runs under its name."""
    import torch

    model.forward = torch.compiler.disable(model.forward)
    return model


_MASK_DROPPED = Fault(
    _fault("ort_cpu", "fault_ort_mask_dropped", loader=_mask_dropped_loader),
    "ort_cpu", "llama", "fp32", "pad_left", "logits", "max|variant - golden|",
    "exported decoder graph with its attention_mask input replaced by ones")

ONNX_FAULTS: list[Fault] = [
    _MASK_DROPPED,
    replace(_MASK_DROPPED, model="bert", padding="pad_right",
            description="exported encoder graph with its attention_mask input replaced by ones"),
    Fault(_fault("ort_cpu", "fault_ort_cuda_falls_back", loader=_cpu_whatever_was_asked,
                 load_kwargs=lambda dtype: {"provider": onnx_runtime.CUDA},
                 proof=_both(onnx_runtime.proof(onnx_runtime.CUDA))),
          "ort_cpu", "bert", "fp32", "", "onnx_provider", "asked for CUDAExecutionProvider",
          "CUDA provider asked for, the session silently runs on the CPU"),
    Fault(_fault("ort_cpu", "fault_ort_save_nudged", loader=_save_nudged_loader),
          "ort_cpu", "gpt2", "fp32", "", "onnx_save_reload", "reloaded model is not the saved one",
          "save_pretrained writes every weight one ulp off"),
]

COMPILE_FAULTS: list[Fault] = [
    Fault(_fault("compile", "fault_compile_skipped", post_load=_compile_skipped),
          "compile", "gpt2", "fp32", "nopad", "logits", "compiled path did not run",
          "the compiled forward is excluded from compilation and runs eagerly"),
]


def register() -> None:
    """Add the faults to the registry (idempotent)."""
    for fault in ONNX_FAULTS + COMPILE_FAULTS:
        REGISTRY[fault.variant.id] = fault.variant


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Registered only when loaded as a plugin (-p): importing this module changes nothing."""
    register()
