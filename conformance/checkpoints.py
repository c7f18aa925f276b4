"""Why a checkpoint directory cannot load, said in one line: the diagnosis a failed load is
named by (running.load), and the damages the round-trip checks plant and must see named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conformance.zoo import ZooModel


def checkpoint_problem(zoo_model: ZooModel, workdir: Path) -> str | None:
    """Why a checkpoint directory cannot load, in one line, or None when it looks intact.

    Checked in the order a loader meets them: shards an index lists but the directory lacks,
    safetensors files shorter than their own header says, tensors whose shapes the config does
    not build. Never raises: a diagnosis that fails leaves the library's own message.
    """
    path = Path(zoo_model.location) if zoo_model.source != "config" else workdir / zoo_model.name
    try:
        if not path.is_dir():
            return None
        problem = _missing_shard(path) or _truncated(path) or _config_mismatch(path, zoo_model.kind)
    except Exception:
        return None
    return f"damaged checkpoint: {problem}" if problem else None


def _missing_shard(path: Path) -> str | None:
    for index in sorted(path.glob("*.index.json")):
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
        absent = [s for s in shards if not (path / s).is_file()]
        if absent:
            return (f"shard {absent[0]} is missing ({index.name} lists {len(shards)} shards, "
                    f"{len(absent)} absent)")
    return None


def safetensors_header(file: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(header, None), or (None, why the file is truncated or corrupt)."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return None, f"{file.name} is truncated: {size} bytes, shorter than its 8-byte header length"
        length = int.from_bytes(head, "little")
        if size < 8 + length:
            return None, (f"{file.name} is truncated: {size} bytes, its header alone needs "
                          f"{8 + length}")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            return None, f"{file.name} is corrupt: its header is not valid JSON"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    needed = 8 + length + max(ends, default=0)
    if size < needed:
        return None, f"{file.name} is truncated: {size} bytes, its header describes {needed}"
    return header, None


def _truncated(path: Path) -> str | None:
    for file in sorted(path.glob("*.safetensors")):
        _, problem = safetensors_header(file)
        if problem:
            return problem
    return None


def _config_mismatch(path: Path, kind: str) -> str | None:
    """Shapes in the checkpoint against the shapes its config.json builds (on the meta device)."""
    import torch
    from transformers import AutoConfig

    from conformance.zoo import auto_class

    found: dict[str, list[int]] = {}
    for file in sorted(path.glob("*.safetensors")):
        header, _ = safetensors_header(file)
        for key, meta in (header or {}).items():
            if key != "__metadata__":
                found[key] = list(meta["shape"])
    config = AutoConfig.from_pretrained(str(path))
    if not found or getattr(config, "quantization_config", None) is not None:
        return None  # packed quantized shapes are not the config's shapes
    with torch.device("meta"):
        skeleton = auto_class(kind).from_config(config)
    prefix = f"{getattr(skeleton, 'base_model_prefix', '')}."

    def bare(key: str) -> str:
        return key.removeprefix(prefix) if prefix != "." else key

    expected = {bare(k): list(v.shape) for k, v in skeleton.state_dict().items()}
    differ = [(k, shape, expected[bare(k)]) for k, shape in sorted(found.items())
              if bare(k) in expected and expected[bare(k)] != shape]
    if not differ:
        return None
    key, shape, want = differ[0]
    return (f"config.json does not match the weights: {key} is {shape} in the checkpoint, the "
            f"config builds {want} ({len(differ)} tensor(s) differ)")
