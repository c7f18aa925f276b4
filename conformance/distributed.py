"""Distributed variants (C12, C14): a model that transformers shards over several processes.

Each group of distributed cases (one dtype, one world size, one device kind: every model and
variant of the run in it) runs once per session in its own set of rank processes, launched the
way torchrun does (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT set; gloo on CPU, nccl on GPUs),
under a timeout. Each rank runs ``python -m conformance.distributed_worker`` on the same plan of
batches (``TASKS``): it loads each variant under its DistributedConfig and runs the very forwards
the single-process checks run (running.forward, decoding.incremental, decoding.greedy, ...), with
the ops of its first forward counted. Rank 0 writes the outputs back; every rank writes its proof
figures (its parameters' local shapes and placements, whether each shard holds the slice of the
whole model the plan gives that rank, its parameter bytes, its collectives). The parent test
judges them with the suite's own verdicts (compare.*, generation.*), so ids, the report and
expectation files work as for any variant.

A rank that crashes or hangs is one failure line naming the rank and the cause (its last step
and the last line of its error), for every case of the group; the run goes on.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conformance.strategies import BatchSpec

GROUP_TIMEOUT_S = float(os.environ.get("CONFORMANCE_DIST_TIMEOUT", "300"))
CRASH_GRACE_S = 5.0  # after one rank fails, how long the others get to exit before being killed

# the plan of batches every rank runs, and the parent judges (fixed: the ranks run apart from
# Hypothesis; lengths at the 32-wide tile's boundary, length 1, full-width rows)
LOGITS = {"none": BatchSpec((33, 33), "none", seed=11), "right": BatchSpec((33, 1, 17), "right", seed=12),
          "left": BatchSpec((33, 1, 17), "left", seed=12)}
PADDING = BatchSpec((31, 5, 1), "right", seed=13)
BATCH = BatchSpec((17, 9), "right", seed=14)
BATCH_EXTRA = 12  # length of the neighbour added to the reordered rows
CACHE = BatchSpec((12, 7), "left", seed=15)
CACHE_CHUNKS = [5, 3, 1, 1, 1, 1]
GENERATION_PICKS = [(0, 12), (1, 5), (2, 20)]  # (prompt index, truncated to)
# a mixture of experts without trained weights (ep2's only model): token prompts of these lengths
TOKEN_PROMPTS = BatchSpec((12, 5, 20), "none", seed=17)
NEW_TOKENS = 12
SAVE_BATCH = BatchSpec((9, 4), "right", seed=16)

# plan styles -> the dimension of a weight they shard, counted from the end: a linear weight is
# (out, in) and an experts tensor (experts, out, in), so column-wise shards -2 and row-wise -1
# (a 1-D bias: column-wise shards it, row-wise replicates it); embeddings shard the vocabulary
# (dim 0), grouped_gemm the experts (dim 0)
SHARD_DIM = {"colwise": -2, "colwise_rep": -2, "colwise_gather_output": -2, "packed_colwise": -2,
             "rowwise": -1, "rowwise_rep": -1, "packed_rowwise": -1, "rowwise_split_input": -1,
             "embedding_rowwise": 0,
             "embedding_colwise": -1, "grouped_gemm": 0}
BIAS_SHARDED = {"colwise", "colwise_rep", "colwise_gather_output", "packed_colwise"}
# rowwise_split_input (transformers 5.24, Phi-3's fused projections): the input arrives whole from
# a colwise_gather_output module and is split locally; the output is all-reduced like rowwise
REDUCES = {"rowwise", "rowwise_rep", "packed_rowwise", "rowwise_split_input", "embedding_rowwise",
           "ep_dispatch_experts",
           "moe_tp_experts", "all_reduce"}
GATHERS = {"colwise_gather_output", "colwise_rep", "embedding_colwise"}


class DistributedFailure(Exception):
    """The ranks of a group did not deliver: one line naming the rank and the cause."""


@dataclass
class GroupResult:
    outputs: dict[str, Any] = field(default_factory=dict)  # "model/variant/task" -> tensor
    ranks: list[dict[str, Any]] = field(default_factory=list)  # per rank: proof figures by entry
    failure: str | None = None
    seconds: float = 0.0

    def entry(self, model: str, variant: str) -> list[dict[str, Any]]:
        return [rank.get(f"{model}/{variant}", {}) for rank in self.ranks]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _last_error(log: Path) -> str:
    """The exception line of a rank's log (the last line naming an Error), else its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if re.search(r"(Error|Exception|Killed|Signal)\b", ln)
              and not ln.startswith(("File ", "Traceback"))]
    found = (errors or lines or ["empty log"])[-1]
    return re.sub(r"^\[rank\d+\]:\s*", "", found)[:300]


def _step(out: Path, rank: int) -> str:
    try:
        return (out / f"rank{rank}.step").read_text().strip() or "start"
    except OSError:
        return "start (before its first step)"


def launch(spec: dict[str, Any], out: Path, world_size: int, timeout: float = GROUP_TIMEOUT_S,
           ) -> GroupResult:
    """Run the worker on `world_size` ranks; the ranks' results, or a failure naming the rank."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    package_root = str(Path(__file__).resolve().parent.parent)
    port = free_port()
    procs, logs = [], []
    start = time.monotonic()
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "TORCHELASTIC_RUN_ID": "conformance",
               "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]),
               "TOKENIZERS_PARALLELISM": "false"}
        log = out / f"rank{rank}.log"
        logs.append(log)
        with log.open("w") as handle:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "conformance.distributed_worker", str(out / "spec.json")],
                env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=str(out)))
    failure = None
    try:
        failure = _watch(procs, logs, out, timeout, start)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    result = GroupResult(failure=failure, seconds=time.monotonic() - start)
    if failure is None:
        result.ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
        result.outputs = torch.load(out / "outputs.pt", weights_only=False)
    return result


def _watch(procs: list[Any], logs: list[Path], out: Path, timeout: float, start: float) -> str | None:
    while True:
        codes = [proc.poll() for proc in procs]
        bad = [r for r, code in enumerate(codes) if code not in (None, 0)]
        if bad:
            rank = bad[0]
            deadline = time.monotonic() + CRASH_GRACE_S
            while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                time.sleep(0.1)
            return (f"rank {rank} of {len(procs)} crashed (exit code {codes[rank]}) during "
                    f"{_step(out, rank)}: {_last_error(logs[rank])}")
        if all(code == 0 for code in codes):
            missing = [r for r in range(len(procs)) if not (out / f"rank{r}.json").exists()]
            if missing or not (out / "outputs.pt").exists():
                return f"rank {(missing or [0])[0]} exited without writing its results"
            return None
        if time.monotonic() - start > timeout:
            hung = [r for r, code in enumerate(codes) if code is None]
            steps = "; ".join(f"rank {r} in {_step(out, r)}" for r in hung)
            return (f"rank {hung[0]} of {len(procs)} hung: no result after {timeout:.0f} s "
                    f"(still running: {steps})")
        time.sleep(0.1)


# -- the groups of a session: each launched once, shared by xdist workers through a file lock --

_RESULTS: dict[str, GroupResult] = {}


def group_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def group_result(spec: dict[str, Any], root: Path, world_size: int) -> GroupResult:
    """The group's results, launching its ranks the first time any process of the session asks."""
    import fcntl

    key = group_key(spec)
    if key in _RESULTS:
        return _RESULTS[key]
    out = root / f"distributed-{key}"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"distributed-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = out / "done.json"
        if done.exists():
            import torch

            status = json.loads(done.read_text())
            result = GroupResult(failure=status["failure"], seconds=status["seconds"])
            if result.failure is None:
                result.ranks = [json.loads((out / f"rank{r}.json").read_text())
                                for r in range(world_size)]
                result.outputs = torch.load(out / "outputs.pt", weights_only=False)
        else:
            result = launch(spec, out, world_size, timeout=spec.get("timeout", GROUP_TIMEOUT_S))
            done.write_text(json.dumps({"failure": result.failure, "seconds": result.seconds}))
    _RESULTS[key] = result
    return result


# -- what the plan says each rank holds, from first principles (the single-process model) --

def _style(name: str, plan: dict[str, str]) -> str | None:
    generic = re.sub(r"\.\d+(?=\.|$)", ".*", name)
    for pattern, style in plan.items():
        if generic == pattern or fnmatch.fnmatchcase(name, pattern):
            return style
    return None


def plans(model: Any, mode: str) -> dict[str, str]:
    """The plan rules the mode applies (tp: tp_plan; ep: tp_plan with ep_plan taking precedence)."""
    tp = dict(getattr(model, "tp_plan", {}) or {})
    if mode == "ep":  # a module with an EP rule keeps no TP rule
        prefix = model.base_model_prefix
        ep = {(k if k.startswith(prefix + ".") else f"{prefix}.{k}"): v
              for k, v in (getattr(model, "ep_plan", {}) or {}).items()}
        return {**tp, **ep}
    return tp


def _chunk(size: int, parts: int, index: int) -> int:
    step = -(-size // parts)
    return max(0, min(step, size - index * step))


def expected_layout(model: Any, mode: str, world_size: int) -> dict[int, dict[str, tuple[int, ...]]]:
    """Per rank: every parameter it must hold and its local shape, from the plan alone."""
    out: dict[int, dict[str, tuple[int, ...]]] = {r: {} for r in range(world_size)}
    if mode == "pp":
        return _pipeline_layout(model, world_size)
    plan = plans(model, mode)
    for name, param in model.named_parameters():
        module, leaf = name.rsplit(".", 1)
        style = _style(name, plan) or _style(module, plan)
        dim = SHARD_DIM.get(style or "")
        if dim is not None and param.dim() == 1:
            dim = -1 if style in BIAS_SHARDED or style.startswith("embedding") else None
        for rank in range(world_size):
            shape = list(param.shape)
            if dim is not None:
                shape[dim] = _chunk(shape[dim], world_size, rank)
            out[rank][name] = tuple(shape)
    return out


def _pipeline_layout(model: Any, world_size: int) -> dict[int, dict[str, tuple[int, ...]]]:
    """transformers' naive pipeline: base_model.layers split evenly (the remainder to the first
    ranks), the embedding on the first stage (and the last when tied), norm and head on the last."""
    prefix = model.base_model_prefix
    layers = len(getattr(model, prefix).layers)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    out: dict[int, dict[str, tuple[int, ...]]] = {}
    for rank in range(world_size):
        per, extra = divmod(layers, world_size)
        start = rank * per + min(rank, extra)
        end = start + per + (rank < extra)
        first, last = rank == 0, rank == world_size - 1
        held = {}
        for name, param in model.named_parameters():  # a tied head is its embedding
            match = re.match(rf"{prefix}\.layers\.(\d+)\.", name)
            if match:
                keep = start <= int(match.group(1)) < end
            elif ".embed_tokens." in name or name.startswith(f"{prefix}.embed"):
                keep = first or (tied and last)
            else:  # the final norm and the head
                keep = last
            if keep:
                held[name] = tuple(param.shape)
        out[rank] = held
    return out


def expected_collectives(model: Any, mode: str, world_size: int) -> dict[str, int]:
    """The collectives one forward must issue at least, by kind, from the plan's modules."""
    if mode == "pp":
        return {"p2p": world_size - 1}
    plan = plans(model, mode)
    counts = {"all_reduce": 0, "all_gather": 0}
    embedding = _tied_embedding_name(model)
    for name, _ in model.named_modules():
        style = _style(name, plan) if name else None
        if name and name == embedding and style == "embedding_rowwise":
            # tied to a colwise head (Gemma 2/3 on 5.24): the shared weight is one DTensor
            # sharded on the vocab (256 -> 128 per rank, measured), the embedding module gets no
            # hook of its own, and its lookup issued no counted collective (4 all-reduces for the
            # 2 layers, 1 all-gather for the head); test_distributed_logits judges its result
            continue
        if style in REDUCES:
            counts["all_reduce"] += 1
        elif style in GATHERS:
            counts["all_gather"] += 1
    if mode == "ep":  # a module with an EP rule keeps no TP rule; its dispatch all-reduces once
        counts["all_reduce"] = max(counts["all_reduce"], 1)
    return counts


def _tied_embedding_name(model: Any) -> str | None:
    """The input embedding's module name when its weight is tied to the output head."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return None
    embedding = model.get_input_embeddings()
    return next((name for name, module in model.named_modules() if module is embedding), None)


def layout_bytes(layout: dict[str, tuple[int, ...]], itemsize: int) -> int:
    total = 0
    for shape in layout.values():
        n = 1
        for s in shape:
            n *= s
        total += n * itemsize
    return total


def count_collectives(counts: dict[str, int]) -> dict[str, int]:
    """Counted ops (OpCounter names) by collective kind."""
    from conformance.variants import ALL_GATHER_OPS, ALL_REDUCE_OPS, ALL_TO_ALL_OPS, P2P_OPS

    kinds = {"all_reduce": ALL_REDUCE_OPS, "all_gather": ALL_GATHER_OPS, "all_to_all": ALL_TO_ALL_OPS,
             "p2p": P2P_OPS}
    return {kind: sum(n for name, n in counts.items() if any(fnmatch.fnmatchcase(name, p) for p in pats))
            for kind, pats in kinds.items()}


def plan_reason(model: Any, variant: Any) -> str | None:
    """Why a model cannot be sharded this way (no plan of that kind), else None."""
    dist = variant.distributed
    plan = getattr(model, dist.plan, None) or {}
    if not plan:
        return (f"{type(model).__name__} has no {dist.plan} in this transformers (transformers "
                f"refuses it: '`{dist.mode}_size=2` was requested, but ... has no `{dist.plan}`')")
    if dist.mode == "ep" and not getattr(model, "tp_plan", None):
        return f"{type(model).__name__} has no tp_plan: ep over 2 ranks needs tp_size=2"
    return None


# what a refusal of a sharding must name (its cause), in one line
LIMIT_REFUSAL_WORDS = ("tp_size", "tensor parallel", "divisib", "divide", "heads", "quantiz",
                       "bitsandbytes", "not supported", "does not support")


def limit_outcome(entry: dict[str, Any], logits: Any) -> tuple[str, str | None]:
    """(what happened, failure or None) for one limit, from rank 0's entry and logits output:
    refused at load in one line naming the cause (a pass), refused unclearly, failed after
    loading, accepted and then crashed in the forward, or ran (then judged like any variant)."""
    error = entry.get("error")
    if error and entry.get("at_load"):
        named = any(word in error.lower() for word in LIMIT_REFUSAL_WORDS)
        if named and "\n" not in error:
            return "refused at load", None
        return "refused at load", f"refused at load, but not in one line naming the cause: {error!r}"
    if error:
        return "failed after loading", f"rank 0 failed after loading: {error}"
    if logits is None or isinstance(logits, dict):
        raised = logits["error"] if isinstance(logits, dict) else "no output written"
        return "crashed", f"accepted at load (no refusal), then its forward raised on rank 0: {raised}"
    return "ran", None


def token_prompted(zoo_model: Any) -> bool:
    """A mixture of experts without trained weights: it generates from fixed token rows
    (TOKEN_PROMPTS), so that expert parallelism, which takes no other model, is judged on greedy
    decoding too."""
    from conformance.routing import routed_k
    from conformance.zoo import model_config

    return not zoo_model.trained and routed_k(model_config(zoo_model)) is not None


def generation_rows(zoo_model: Any, vocab_size: int) -> list[Any] | None:
    """The prompts the ranks generate from, each row's tokens: the shipped prompts under a trained
    model's tokenizer (GENERATION_PICKS), or a `token_prompted` model's fixed rows; None for any
    other model, or a trained one without a tokenizer."""
    import torch

    from conformance import generation

    if token_prompted(zoo_model):
        return TOKEN_PROMPTS.rows(vocab_size)
    corpus = generation.prompts(zoo_model.location) if zoo_model.trained else None
    return [torch.tensor(corpus[i][:n]) for i, n in GENERATION_PICKS] if corpus else None
