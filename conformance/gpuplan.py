"""`gpu/run --plan`: count what each GPU phase would run, by a collection-only dry run.

The dry run collects the suite as on the lent H200 (``CONFORMANCE_PLAN_DEVICE``: the registry's
needs are judged against a planned sm90 device, and the plugin refuses to run any test under
it), applies the phase's selection, and writes each kept item with its collection-time skip
reason to a JSON file (this module is also the pytest plugin that writes it). A skip that names
only a package the kit carries (bitsandbytes, optimum, flash-attn-4 ...) is counted as a case
that will run there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conformance import gpukit

OUTPUT = "CONFORMANCE_PLAN_OUTPUT"
# planning figure for one budget sweep point at kernel scale on the GPU: warm-up, the CUDA policy's
# 10 ABBA rounds of a 1-15 ms forward and the memory calls (assumed until an H200 run measures it;
# a phase that overruns is interrupted at its share of the call and its report still written)
POINT_SECONDS = 10.0


@dataclass(frozen=True)
class Counted:
    runnable: list[tuple[str, str | None, str | None, str | None]]
    skipped: int
    carried: int
    sweep_points: int
    top_skips: list[tuple[str, int]]


def carried_packages() -> set[str]:
    return {p["pin"].split("==")[0] for p in gpukit.manifest()["pins"]}


def only_carried_missing(reason: str, packages: set[str]) -> bool:
    """A skip for a package that is missing here and that the kit installs there."""
    if "(not installed)" not in reason and "does not import" not in reason:
        return False
    return any(f"needs {name}" in reason or f"and {name}" in reason or
               (name.startswith("flash-attn-4") and "flash_attn.cute" in reason) for name in packages)


def collect(phase: gpukit.Phase, env: dict[str, str], root: Path) -> Counted | str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "items.json"
        no_xdist = [] if phase.budgets else ["-p", "no:xdist"]
        cmd = [sys.executable, "-m", "pytest", *phase.pytest_args(None), "--collect-only", *no_xdist,
               "-p", "conformance.gpuplan"]
        done = subprocess.run(cmd, cwd=root, env={**env, **phase.env, OUTPUT: str(out)},
                              capture_output=True, text=True)
        if not out.is_file():
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            return " | ".join(tail) or f"pytest exited {done.returncode}"
        items = json.loads(out.read_text())
    packages = carried_packages()
    runnable, reasons = [], Counter()
    carried = points = 0
    for item in items:
        key = (item["check"], item["model"], item["variant"], item["dtype"])
        reason = item["skip"]
        if reason is None or only_carried_missing(reason, packages):
            runnable.append(key)
            carried += reason is not None
            points += item["points"]
        else:
            reasons[reason[:140]] += 1
    return Counted(runnable, sum(reasons.values()), carried, points, reasons.most_common(4))


def pytest_collection_finish(session: Any) -> None:
    target = os.environ.get(OUTPUT)
    if not target:
        return
    rows = []
    for item in session.items:
        check, model, variant, dtype = gpukit.item_key(item)
        skip = item.get_closest_marker("skip")
        reason = None
        if skip is not None:
            reason = str(skip.kwargs.get("reason", skip.args[0] if skip.args else "skipped"))
        budget = getattr(getattr(item, "callspec", None), "params", {}).get("budget")
        points = len(getattr(budget, "seqs", ()) or ()) or (1 if budget is not None else 0)
        rows.append({"check": check, "model": model, "variant": variant, "dtype": dtype,
                     "skip": reason, "points": points})
    Path(target).write_text(json.dumps(rows))
