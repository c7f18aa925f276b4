"""Sensitivity of the logits check, measured: the smallest relative perturbation of one layer's
output that the kernel tolerance of each dtype catches.

    python tests/sensitivity.py [--models llama gpt2 bert tiny-llama-trained] [--dtypes fp32 bf16]

For each model and dtype, the sdpa variant gets its first layer's output perturbed by
eps * mean|x| * z, z a fixed standard-normal pattern (an additive error of relative size eps
that the following norms cannot scale away), swept over eps, and is judged exactly as
test_logits judges it, on fixed batches (no padding, right and left padding). A perturbation
counts as caught when any batch fails. Prints a table; docs/tolerances.md quotes it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

EPSILONS = (3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7)
BATCHES = (((24,), "none"), ((40, 9, 33), "right"), ((40, 9, 33), "left"), ((65, 64), "right"))


def perturb(x: torch.Tensor, epsilon: float) -> torch.Tensor:
    """x + eps * mean|x| * z with z ~ N(0, 1) fixed per position (seeded, batch-independent)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(x.shape[-2] * x.shape[-1], generator=gen).view(x.shape[-2:]).to(x.dtype)
    return x + epsilon * x.abs().mean() * z


# torch.testing.assert_close's default (rtol, atol) per dtype: the fixed table many test suites use
FIXED_TABLE = {"fp32": (1.3e-6, 1e-5), "bf16": (1.6e-2, 1e-5), "fp16": (1e-3, 1e-5)}


def fixed_table_fails(out: torch.Tensor, golden: torch.Tensor, real: torch.Tensor, dtype: str) -> bool:
    rtol, atol = FIXED_TABLE[dtype]
    sel = real[..., None].expand_as(golden)
    return bool(((out - golden).abs()[sel] > atol + rtol * golden.abs()[sel]).any())


def caught(model: str, dtype: str, epsilon: float, workdir: Path) -> tuple[bool, float, bool]:
    """(caught?, worst err_over_bound, caught by the fixed table?) for one perturbation size."""
    from faults import _hook_first_layer

    from conformance import compare, running, zoo
    from conformance.checks import golden_per_row
    from conformance.strategies import BatchSpec
    from conformance.variants import REGISTRY

    zoo_model = zoo.resolve(model, zoo.default_zoo())
    cache = running.ModelCache(workdir, "cpu")
    perturbed = replace(REGISTRY["sdpa"], id=f"perturbed_{epsilon:g}",
                        post_load=_hook_first_layer(lambda x: perturb(x, epsilon)))
    variant = running.load(zoo_model, perturbed, dtype, "cpu", workdir)
    reference = cache.get(zoo_model, REGISTRY["eager"], dtype)
    golden = cache.golden(zoo_model, dtype)
    worst, hit, fixed = 0.0, False, False
    for lengths, padding in BATCHES:
        batch = BatchSpec(lengths, padding, seed=1)
        expected = cache.outputs(golden, batch, per_row=golden_per_row(zoo_model.kind, padding))
        out = running.forward(variant, batch)
        problem, figures = compare.kernel_verdict(
            out, cache.outputs(reference, batch), expected, batch.mask().bool(), dtype)
        worst = max(worst, figures["err_over_bound"])
        hit = hit or problem is not None
        fixed = fixed or fixed_table_fails(out, expected, batch.mask().bool(), dtype)
    return hit, worst, fixed


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama", "gpt2", "bert", "tiny-llama-trained"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="smallest relative perturbation of one layer caught by test_logits")
    for column in ("model", "dtype", "smallest caught", "largest missed", "err/bound at smallest",
                   "fixed table: smallest caught", "fixed table fails unperturbed"):
        table.add_column(column)
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for dtype in args.dtypes:
                smallest, missed, ratio, fixed_smallest = None, None, None, None
                for epsilon in EPSILONS:
                    hit, worst, fixed = caught(model, dtype, epsilon, Path(tmp))
                    if fixed:
                        fixed_smallest = epsilon
                    if hit and missed is None:
                        smallest, ratio = epsilon, worst
                    elif missed is None:
                        missed = epsilon
                false_alarm = caught(model, dtype, 0.0, Path(tmp))
                table.add_row(model, dtype, f"{smallest:g}" if smallest else "none",
                              f"{missed:g}" if missed else "-", f"{ratio:.2f}" if ratio else "-",
                              f"{fixed_smallest:g}" if fixed_smallest else "none",
                              f"{_yes(false_alarm[2])} (ours: {_yes(false_alarm[0])})")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
