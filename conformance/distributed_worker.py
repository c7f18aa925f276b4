"""One rank of a distributed group (conformance/distributed.py launches it, torchrun-style).

``python -m conformance.distributed_worker SPEC``: for each (model, variant) of the spec, load
the variant under its DistributedConfig, record the proof figures, run the plan of batches
(distributed.TASKS) with the very helpers the single-process checks use, and, on rank 0, write
the outputs. A failure inside one entry is recorded for that entry; the other entries still run.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any


def _mark(out: Path, rank: int, step: str) -> None:
    (out / f"rank{rank}.step").write_text(step)


def _params(model: Any) -> dict[str, Any]:
    """Each parameter's local shape, placements and bytes on this rank."""
    out = {}
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        out[name] = {"shape": list(param.shape), "local": list(local.shape),
                     "dtensor": hasattr(param, "placements"),
                     "placements": [str(p) for p in getattr(param, "placements", ())],
                     "bytes": int(local.numel() * local.element_size())}
    return out


def _shard_problems(model: Any, whole: Any, rank: int, unverified: list[str]) -> list[str]:
    """Parameters whose local shard is not the slice of the whole model the plan gives this rank
    (a shard loaded on the wrong rank), or whose replicated copy differs from the whole model's."""

    want = dict(whole.named_parameters())
    problems: list[str] = []
    for name, param in model.named_parameters():
        if name not in want:
            continue
        full = want[name].detach()
        if param.dtype != full.dtype:  # quantized storage (int8 rows, packed 4-bit): no slice of
            unverified.append(name)    # the whole model's weights to compare it with
            continue
        if hasattr(param, "placements"):
            local = param.to_local().detach()
            expected = full
            coordinate = param.device_mesh.get_coordinate() or [0]
            for axis, placement in enumerate(param.placements):
                if placement.is_shard():
                    parts = param.device_mesh.size(axis)
                    step = -(-full.shape[placement.dim] // parts)
                    expected = expected.narrow(placement.dim, min(step * coordinate[axis],
                                                                  expected.shape[placement.dim]),
                                               local.shape[placement.dim])
        else:  # a plain tensor: the whole, or (transformers 5.13-5.14) the rank's slice itself
            local, expected = param.detach(), full
        packed = _packed_slice(param, full) if hasattr(param, "placements") else None
        if not hasattr(param, "placements") and tuple(local.shape) != tuple(full.shape):
            expected, packed = _plain_slices(local, full, rank)
        if not _same(local, expected) and not (packed is not None and _same(local, packed)):
            if full.dim() == 3 and tuple(local.shape) != tuple(full.shape):
                # a packed experts tensor sharded column-wise (moe_tp_experts): transformers
                # re-packs it from the checkpoint's per-expert layout; its slice is not checked
                unverified.append(name)
                continue
            problems.append(name)
    return problems


def _same(a: Any, b: Any) -> bool:
    import torch

    return tuple(a.shape) == tuple(b.shape) and torch.equal(a.cpu(), b.cpu())


def _plain_slices(local: Any, full: Any, rank: int) -> tuple[Any, Any]:
    """A shard held as a plain tensor (no DTensor placements; transformers 5.13-5.14 keep only the
    rank's slice): the contiguous slice and the packed one along the one dimension whose size
    differs, this rank's by its index; (full, None) where the shapes differ otherwise."""
    import torch

    dims = [d for d in range(full.dim()) if local.dim() == full.dim() and local.shape[d] != full.shape[d]]
    if len(dims) != 1:
        return full, None
    dim = dims[0]
    parts = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    step = -(-full.shape[dim] // parts)
    contiguous = full.narrow(dim, min(step * rank, full.shape[dim]), local.shape[dim])
    halves = full.chunk(2, dim=dim)
    packed = (torch.cat([h.chunk(parts, dim=dim)[rank] for h in halves], dim=dim)
              if parts > 1 and all(h.shape[dim] >= parts for h in halves) else None)
    return contiguous, packed


def _packed_slice(param: Any, full: Any) -> Any:
    """A packed projection (gate and up in one tensor, "packed_colwise"): each rank holds its
    slice of each half, concatenated."""
    import torch

    placement = next((p for p in param.placements if p.is_shard()), None)
    if placement is None:
        return full
    coordinate = (param.device_mesh.get_coordinate() or [0])[0]
    parts = param.device_mesh.size(0)
    halves = full.chunk(2, dim=placement.dim)
    return torch.cat([h.chunk(parts, dim=placement.dim)[coordinate] for h in halves], dim=placement.dim)


def _run_entry(entry: dict[str, Any], spec: dict[str, Any], rank: int, out: Path) -> tuple[dict, dict]:
    import torch

    from conformance import decoding
    from conformance import distributed as dist_plan
    from conformance.probes import OpCounter
    from conformance.running import forward, forward_ids, forward_per_row, load
    from conformance.strategies import BatchSpec, pad_rows
    from conformance.variants import REGISTRY, SHARDING_LIMITS
    from conformance.zoo import ZooModel

    zoo_model = ZooModel(**entry["model"])
    if entry["variant"] not in REGISTRY and entry.get("registered_by"):
        module, function = entry["registered_by"].split(":")
        getattr(importlib.import_module(module), function)()
    variant = REGISTRY.get(entry["variant"]) or SHARDING_LIMITS[entry["variant"]]
    dtype, device, workdir = spec["dtype"], spec["device"], Path(spec["workdir"])
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    key = f"{zoo_model.name}/{variant.id}"
    _mark(out, rank, f"{key}: load")
    loaded = load(zoo_model, variant, dtype, device, workdir)
    if variant.distributed.worker_hook:  # a planted fault's hook (tests/faults_distributed.py)
        _mark(out, rank, f"{key}: worker hook {variant.distributed.worker_hook}")
        module, function = variant.distributed.worker_hook.split(":")
        getattr(importlib.import_module(module), function)(loaded.model, rank)
    whole = load(zoo_model, replace(REGISTRY["eager"]), dtype, "cpu", workdir)
    unverified: list[str] = []
    figures: dict[str, Any] = {"params": _params(loaded.model),
                               "shard_problems": _shard_problems(loaded.model, whole.model, rank, unverified),
                               "shards_unverified": unverified}
    del whole
    outputs: dict[str, Any] = {}

    def task(name: str, run: Any) -> None:
        _mark(out, rank, f"{key}: {name}")
        try:
            outputs[name] = run()
        except Exception as exc:  # one task's error is that check's failure line, not the group's
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            outputs[name] = {"error": f"{type(exc).__name__}: {first}"}
            # in the rank's log too: where a stage raised and its peer hangs, the log says why
            print(f"rank {rank} {key}: {name} raised {type(exc).__name__}: {first}", flush=True)

    counter = OpCounter()
    task("proof", lambda: forward(loaded, dist_plan.LOGITS["right"], counter))
    figures["ops"] = dict(counter.counts)
    for padding, batch in dist_plan.LOGITS.items():
        task(f"logits/{padding}", lambda batch=batch: forward(loaded, batch))
    canonical = dist_plan.PADDING
    task("padding/alone", lambda: forward_per_row(loaded, canonical))
    for side in ("right", "left"):
        task(f"padding/{side}", lambda side=side: forward(loaded, replace(canonical, padding=side)))
    rows = dist_plan.BATCH.rows(loaded.vocab_size)
    extra = BatchSpec((dist_plan.BATCH_EXTRA,), "none", dist_plan.BATCH.seed + 1).rows(loaded.vocab_size)[0]
    width = dist_plan.BATCH.width

    def padded(rows: list[Any]) -> Any:
        ids, mask = pad_rows(rows, "right", loaded.pad_id, width)
        return forward_ids(loaded, ids, mask)

    task("batch/first", lambda: padded(rows))
    task("batch/second", lambda: padded([*reversed(rows), extra]))
    ids, mask = dist_plan.CACHE.materialize(loaded.vocab_size, loaded.pad_id)
    task("cache/full", lambda: decoding.full_with_cache_off(loaded, ids, mask))
    task("cache/dynamic", lambda: decoding.incremental(loaded, ids, mask, dist_plan.CACHE_CHUNKS, "dynamic"))
    prompt_rows = dist_plan.generation_rows(zoo_model, loaded.vocab_size)
    if prompt_rows:
        gids, gmask = pad_rows(prompt_rows, "left", loaded.pad_id)
        task("generation", lambda: decoding.greedy(loaded, gids, gmask, dist_plan.NEW_TOKENS))
    saved = workdir / "distributed-saved" / f"{zoo_model.name}-{variant.id}-{dtype}"

    def save() -> str:
        loaded.model.save_pretrained(str(saved))
        return str(saved)

    if variant.distributed.mode != "pp":  # a pipeline stage holds only its layers
        task("saved", save)
    task("saved/outputs", lambda: forward(loaded, dist_plan.SAVE_BATCH))
    figures["digest"] = {name: float(v.nan_to_num().abs().sum()) for name, v in outputs.items()
                         if isinstance(v, torch.Tensor)}
    figures["errors"] = {name: v["error"] for name, v in outputs.items() if isinstance(v, dict)}
    return figures, {f"{key}/{name}": value for name, value in outputs.items()}


def main(spec_path: str) -> int:
    import torch
    import torch.distributed as torch_dist

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec_path).parent
    rank = int(os.environ["RANK"])
    from datetime import timedelta

    torch.set_num_threads(1)
    _mark(out, rank, "init_process_group")
    torch_dist.init_process_group(spec["backend"], timeout=timedelta(seconds=spec.get("timeout", 300)))
    figures: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    for entry in spec["entries"]:
        key = f"{entry['model']['name']}/{entry['variant']}"
        try:
            found, produced = _run_entry(entry, spec, rank, out)
        except Exception as exc:
            from conformance.running import LoadError

            first = (str(exc).strip().splitlines() or [""])[0][:400]
            found = {"error": first if isinstance(exc, LoadError) else f"{type(exc).__name__}: {first}",
                     "refused": bool(getattr(exc, "refused", False)),
                     "at_load": isinstance(exc, LoadError),
                     "traceback": traceback.format_exc()[-2000:]}
            produced = {}
        figures[key] = found
        outputs.update(produced)
        _mark(out, rank, f"{key}: done")
    _mark(out, rank, "writing results")
    if rank == 0:
        torch.save(outputs, out / "outputs.tmp")
        os.replace(out / "outputs.tmp", out / "outputs.pt")
    (out / f"rank{rank}.tmp").write_text(json.dumps(figures))
    os.replace(out / f"rank{rank}.tmp", out / f"rank{rank}.json")
    _mark(out, rank, "finished")
    with contextlib.suppress(Exception):
        torch_dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
