"""Planted faults in sharded execution, each a distributed variant beside the healthy tp2, and
the check that must catch it. Registered only when asked for (``-p faults_distributed``), in a
tryfirst pytest_configure, never at import. The hooks run inside each rank's process (the worker
imports this module by name: the self-tests put tests/ on PYTHONPATH).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any

import pytest


@dataclass(frozen=True)
class DistFault:
    name: str  # the variant id
    check: str  # the test function (without "test_") that must catch it
    message: str  # a fragment its failure line must contain
    description: str
    replicated: bool = False
    hook: str = ""
    selection: str = ""


FAULTS = (
    DistFault("fault_tp2_replicated", "distributed_placement", "a replicated model runs none",
              "tp_plan ignored: every rank loads the whole model and runs it alone", replicated=True),
    DistFault("fault_tp2_skip_allreduce", "distributed_logits", "max|variant - golden|",
              "rank 1 takes part in each row-parallel all-reduce but keeps its own partial sum",
              hook="faults_distributed:skip_allreduce_on_rank1", selection="pad_right"),
    DistFault("fault_tp2_swapped_shards", "distributed_placement", "a shard loaded on the wrong rank",
              "layer 0's attention shards loaded on the other rank (a consistent head permutation: "
              "the logits do not change, only the shards' contents show it)",
              hook="faults_distributed:swap_attention_shards"),
)
# the launcher's own failures: one line naming the rank and the cause
LAUNCH_FAULTS = (
    DistFault("fault_tp2_rank1_crashes", "distributed_placement", "rank 1 of 2 crashed (exit code 3)",
              "rank 1 exits right after loading", hook="faults_distributed:crash_rank1"),
    DistFault("fault_tp2_rank1_hangs", "distributed_placement", "hung: no result after",
              "rank 1 sleeps after loading", hook="faults_distributed:hang_rank1"),
)


def skip_allreduce_on_rank1(model: Any, rank: int) -> None:
    """Only while this model runs: the other variants of the same launch stay healthy."""
    import torch.distributed as dist

    if rank != 1:
        return
    original, forward = dist.all_reduce, model.forward

    def all_reduce(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        return original(tensor.clone(), *args, **kwargs)  # the sum goes nowhere

    def faulty_forward(*args: Any, **kwargs: Any) -> Any:
        dist.all_reduce = all_reduce
        try:
            return forward(*args, **kwargs)
        finally:
            dist.all_reduce = original

    model.forward = faulty_forward


def swap_attention_shards(model: Any, rank: int) -> None:
    """Each rank gets the other rank's slice of layer 0's q/k/v/o projections."""
    import torch

    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
            param = proj.weight
            placement = param.placements[0]
            full = param.full_tensor()
            parts = param.device_mesh.size(0)
            other = full.chunk(parts, dim=placement.dim)[(rank + 1) % parts]
            param.to_local().copy_(other)


def crash_rank1(model: Any, rank: int) -> None:
    if rank == 1:
        os._exit(3)


def hang_rank1(model: Any, rank: int) -> None:
    if rank == 1:
        time.sleep(3600)


def _variant(fault: DistFault) -> Any:
    from conformance.variants import REGISTRY

    base = REGISTRY["tp2"]
    dist = replace(base.distributed, replicated=fault.replicated, worker_hook=fault.hook,
                   registered_by="faults_distributed:register")
    return replace(base, id=fault.name, distributed=dist,
                   load_kwargs=lambda dtype: {**dist.load_kwargs(), "attn_implementation": "eager"})


def register() -> None:
    from conformance.variants import REGISTRY

    for fault in FAULTS + LAUNCH_FAULTS:
        REGISTRY[fault.name] = _variant(fault)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    register()
