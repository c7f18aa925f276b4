"""The GPU run, prepared: what a short GPU lease runs, how its packages travel, and its plan.

A lent H200 gives 15 minutes of device time in all, 10 per command, no network, and 64 MiB
carried per call; it is handed back 30 s after a command ends, and files written outside the
checkout survive only while it is up. So the run is fixed ahead of time, here:

- **What runs** (`PHASES`): the GPU rows issue 17 names, as selection rules over the suite's
  own items (check, model, variant, dtype). Call 1 runs everything that needs no FA4; call 2 runs
  FlashAttention-4. Each call's checks run under xdist, then its budget sweep runs alone (a
  sweep timed beside busy workers would measure them).
- **What travels** (`gpu/wheels.json`, written by `gpu/run --fetch`): pinned wheels, split over
  the two calls. The CuTe DSL's native library wheel (92 MB) is larger than a call, so its
  bytes travel in two parts, the first staged in STAGE by call 1 and joined by call 2.
  bitsandbytes travels with only the CUDA 13 libraries the machine's torch loads (43 MB -> 8 MB).
- **How long** (`plan`): a collection-only dry run on any machine, under a planned device,
  counts the items each phase selects and runs, and scales them by the per-check seconds
  measured on CPU (`CHECK_SECONDS`).

This module needs the standard library alone: it runs on the device before anything is
installed. `gpu/run` is its command line; it is also the pytest plugin (`-p conformance.gpukit`)
that applies a phase's selection.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "gpu" / "wheels.json"
WHEELS = ROOT / ".whl"
STAGE = Path(os.environ.get("CONFORMANCE_GPU_STAGE", "/tmp/gpu-kit"))
CALL_LIMIT = 64 * 2**20  # what one device call carries: working tree + carried wheels
CALL_MARGIN = 3 * 2**20  # room left for files that change between the check and the call
CALL_SECONDS = 6 * 60  # a call's selection must fit this; the rest of its 10 minutes is start-up,
# install, report writing and the margin that leaves time for a second try
PLANNED_DEVICE = "NVIDIA H200@9.0"  # the lent machine (sm90), for `--plan`
BUDGET_FILE = "fixtures/budgets/sm90.toml"
FETCH = "gpu/run --fetch"
EXIT_UNUSABLE = 4  # the exit code of one-line refusals (no CUDA, a missing wheel)

# Mean seconds per executed case of each check, measured on this project's 2-core CPU machine
# (reports/full2-current, the default run on transformers 5.24 with -n 2, 2026-12-01; `mean
# duration_s` over the passed/failed/xfailed records; options and output_attentions from
# reports/s14-current, the same run with them). A GPU case of the zoo's tiny models is
# launch-bound, not compute-bound; until the first H200 run measures it, the plan takes it as
# GPU_OVER_CPU times the CPU figure (an assumption, stated in every plan).
CHECK_SECONDS = {
    "batch_invariance": 0.12, "cache_consistency": 0.17, "determinism": 0.10, "fa2_refuses_what_it_"
    "cannot_run": 0.02, "fully_padded_and_tiny": 0.30, "generation": 0.88, "logits": 0.31,
    "mask_equivalence": 0.10, "packed_equivalence": 0.14, "padding_invariance": 0.19,
    "quantized_cast_refused": 0.16, "quantized_compute_dtype": 0.01, "quantized_footprint": 0.06,
    "quantized_memory_cap": 0.44, "quantized_quality": 0.24, "quantized_save_after_use": 0.15,
    "quantized_save_load": 0.17, "save_load": 0.14, "disk_offload": 0.16, "device_map_plan": 0.03,
    "memory_cap_forces_disk_offload": 0.18, "tied_weights_offloaded": 0.09,
    "disk_offload_without_folder_is_refused": 0.02, "options": 0.13, "output_attentions": 0.08,
}
DEFAULT_CHECK_SECONDS = 0.3  # a check not in the table: about the logits check's cost
GPU_OVER_CPU = 2.0
COMPILE_SECONDS = 40.0  # per compile case: inductor's first compile of a graph (measured 11-50 s
# per graph on CPU; CUDA graphs add capture) - a planning figure, not a measurement on the GPU
PHASE_STARTUP_S = 45.0  # interpreter, torch + transformers imports and xdist workers (measured
# 20-30 s for `-n 2` here; 8 workers import in parallel on 16 cores)


@dataclass(frozen=True)
class Rule:
    """Items whose check, model, variant and dtype match these globs."""

    checks: tuple[str, ...]
    variants: tuple[str, ...] = ("*",)
    models: tuple[str, ...] = ("*",)
    dtypes: tuple[str, ...] = ("*",)
    not_variants: tuple[str, ...] = ()  # variants matching these globs are left out

    def matches(self, check: str, model: str | None, variant: str | None, dtype: str | None) -> bool:
        def hit(value: str | None, globs: tuple[str, ...]) -> bool:
            if value is None:  # an item without a case (a whole-run check): only wildcards take it
                return globs == ("*",)
            return any(fnmatch.fnmatchcase(value, g) for g in globs)

        if variant is not None and any(fnmatch.fnmatchcase(variant, g) for g in self.not_variants):
            return False
        return (hit(check, self.checks) and hit(model, self.models) and hit(variant, self.variants)
                and hit(dtype, self.dtypes))


@dataclass(frozen=True)
class Phase:
    name: str
    call: int
    rules: tuple[Rule, ...]
    workers: int = 8  # 16 cores, one GPU: the workers share it
    budgets: bool = False  # a budget sweep: run alone, serially
    env: dict[str, str] = field(default_factory=dict)

    def pytest_args(self, out: Path | None) -> list[str]:
        """The phase's pytest command line; `out` None: for a collection-only dry run (no report,
        no workers)."""
        args = ["--pyargs", "conformance", "--device", "cuda", "-p", "conformance.gpukit",
                "--gpu-phase", self.name, "--hypothesis-profile", "ci", "-p", "no:randomly", "-q"]
        if out is not None:
            args += ["--conformance-report", str(out / self.name), "-rfE"]
        if self.budgets:
            args += ["-m", "budget", "--budgets", str(ROOT / BUDGET_FILE), "-p", "no:xdist"]
        else:
            args += ["-m", "not budget"]
            if out is not None:
                args += ["-n", str(self.workers)]
        return args


DECODERS_PROPS = ("llama", "mistral")  # GQA and a sliding window
ENCODER_PROPS = ("bert",)
PROPERTIES = ("padding_invariance", "batch_invariance", "mask_equivalence", "packed_equivalence",
              "fully_padded_and_tiny", "determinism", "cache_consistency", "options",
              "output_attentions")
QUANT = ("quantized_*", "logits")
NOT_FA4 = ("eager", "sdpa*", "sdp_kernel*")
FLASH = ("*fa2*", "*fa4*")  # FA2 is not on the lent machine (sdist only); FA4 is call 2's

PHASES: tuple[Phase, ...] = (
    Phase("checks", 1, (
        # every SDPA variant (and the plain reference) in fp16, bf16 and fp32, on every zoo model
        Rule(("logits",), variants=NOT_FA4),
        # each bitsandbytes variant and combination: logits and the quantization checks
        Rule(QUANT, variants=("bnb_*", "load_in_*"), models=("llama", "bert", "tiny-llama-trained"),
             not_variants=FLASH),
        # CUDA graphs on one decoder, in one dtype (each case compiles)
        Rule(("logits",), variants=("compile_reduce_overhead",), models=("llama",), dtypes=("bf16",)),
        # the properties on two decoders and an encoder, for the SDPA kernels and one quantization
        Rule(PROPERTIES, variants=NOT_FA4 + ("bnb_nf4",), models=DECODERS_PROPS + ENCODER_PROPS),
        # generation on the trained decoder
        Rule(("generation",), variants=NOT_FA4 + ("bnb_int8", "bnb_nf4"), models=("tiny-llama-trained",)),
        # save/load and CPU/disk offload of a model placed on the GPU (C07, C14)
        Rule(("save_load", "disk_offload", "memory_cap_forces_disk_offload", "tied_weights_offloaded",
              "device_map_plan", "disk_offload_without_folder_is_refused"), models=("llama",)),
        # the refusals (C02 in fp32 on a GPU; bitsandbytes misuse)
        Rule(("*refuses*", "quantized_cast_refused"), not_variants=FLASH),
    ), env={"CONFORMANCE_COMPILE": "1"}),
    # fp16 only in the lease (bf16's sweep is sm90.toml's too: it runs on an unhurried runner)
    Phase("budgets", 1, (Rule(("speed_memory_budget", "footprint_budget"), variants=("sdpa*", "bnb_*"),
                              dtypes=("fp16",), not_variants=FLASH),), budgets=True),
    Phase("fa4", 2, (
        Rule(("logits",), variants=("fa4", "bnb_*+fa4")),
        Rule(PROPERTIES, variants=("fa4",), models=DECODERS_PROPS),
        Rule(("generation",), variants=("fa4",), models=("tiny-llama-trained",)),
        Rule(("quantized_*",), variants=("bnb_*+fa4",), models=("llama",)),
        Rule(("fa2_refuses_what_it_cannot_run",)),
    )),
    Phase("fa4_budgets", 2, (Rule(("speed_memory_budget",), variants=("fa4",)),), budgets=True),
)


def phases(call: int | None = None) -> list[Phase]:
    return [p for p in PHASES if call is None or p.call == call]


def phase_named(name: str) -> Phase:
    for phase in PHASES:
        if phase.name == name:
            return phase
    raise KeyError(f"no GPU phase {name!r} (phases: {', '.join(p.name for p in PHASES)})")


# ---- the pytest plugin: a phase's selection ------------------------------------------------


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("conformance")
    group.addoption("--gpu-phase", default=None, metavar="NAME",
                    help="keep only the items of this GPU-kit phase (conformance/gpukit.py PHASES)")
    group.addoption("--gpu-deadline", type=float, default=None, metavar="EPOCH",
                    help="stop starting tests after this time.time(): the run ends as interrupted, "
                         "its report written (a lease's command limit kills, and writes nothing)")


_DEADLINE: dict[str, Any] = {}


def pytest_configure(config: Any) -> None:
    _DEADLINE["at"] = config.getoption("gpu_deadline", None)
    _DEADLINE["config"] = config


def pytest_runtest_logreport(report: Any) -> None:
    """Past the deadline, stop: pytest after the current test; under xdist, the controller's
    scheduler (its `shouldstop` ends the loop as an interruption, and the session finishes)."""
    import time

    at, config = _DEADLINE.get("at"), _DEADLINE.get("config")
    if at is None or config is None or time.time() < at:
        return
    why = "gpu/run: the phase's time is over"
    dsession = config.pluginmanager.getplugin("dsession")
    if dsession is not None:
        dsession.shouldstop = why
    elif getattr(config, "_conformance_session", None) is not None:
        config._conformance_session.shouldstop = why


def pytest_sessionstart(session: Any) -> None:
    session.config._conformance_session = session


def item_key(item: Any) -> tuple[str, str | None, str | None, str | None]:
    """(check, model, variant, dtype) of a collected item."""
    check = getattr(item, "originalname", item.name).removeprefix("test_")
    params = getattr(getattr(item, "callspec", None), "params", {})
    case = params.get("case")
    if case is None and params.get("budget") is not None:
        case = params["budget"].case
    if case is None:
        return check, None, None, None
    return check, case.model.name, case.variant.id, case.dtype


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    name = config.getoption("gpu_phase")
    if not name:
        return
    phase = phase_named(name)
    keep, drop = [], []
    for item in items:
        key = item_key(item)
        (keep if any(rule.matches(*key) for rule in phase.rules) else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


# ---- what travels --------------------------------------------------------------------------


def manifest() -> dict[str, Any]:
    return json.loads(MANIFEST.read_text())


def tree_bytes(root: Path = ROOT) -> int:
    """Bytes of the working tree a device call sends: tracked files and untracked, not ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=root, capture_output=True, check=True).stdout.split(b"\0")
    total = 0
    for name in filter(None, listed):
        path = root / name.decode()
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def call_bytes(data: dict[str, Any]) -> dict[int, int]:
    """Bytes each call carries, from the manifest."""
    out: dict[int, int] = {}
    for item in data["carried"]:
        out[item["call"]] = out.get(item["call"], 0) + item["size"]
    return out


def size_problems(data: dict[str, Any], tree: int) -> list[str]:
    """Each call's carried bytes plus the tree must stay under the per-call limit, with margin."""
    problems = []
    for call, carried in sorted(call_bytes(data).items()):
        total = carried + tree
        if total > CALL_LIMIT - CALL_MARGIN:
            problems.append(f"call {call} carries {carried / 2**20:.1f} MiB of wheels + "
                            f"{tree / 2**20:.1f} MiB of working tree = {total / 2**20:.1f} MiB, over "
                            f"{(CALL_LIMIT - CALL_MARGIN) / 2**20:.0f} MiB (64 MiB less a "
                            f"{CALL_MARGIN / 2**20:.0f} MiB margin)")
    return problems


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def carried_path(item: dict[str, Any], wheels: Path | None = None) -> Path:
    return (wheels or WHEELS) / f"call{item['call']}" / item["file"]


def missing_carried(data: dict[str, Any], call: int, wheels: Path | None = None) -> list[str]:
    """The files call `call` needs that are not in .whl/ (or differ from the manifest)."""
    wheels = wheels or WHEELS
    problems = []
    for item in data["carried"]:
        if item["call"] != call:
            continue
        path = carried_path(item, wheels)
        if not path.is_file():
            problems.append(f"{path.relative_to(wheels.parent)} is missing")
        elif path.stat().st_size != item["size"]:
            problems.append(f"{path.relative_to(wheels.parent)} has {path.stat().st_size} bytes, "
                            f"the manifest says {item['size']}")
    return problems


# ---- fetching (on a machine with the package index) ----------------------------------------

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def download_command(pin: str, dest: Path, python: str) -> list[str]:
    """The exact `pip download` line for one pinned wheel of the device's Python."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp"]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    return cmd + ["-d", str(dest), pin]


def trim_wheel(source: Path, dest: Path, drop: str) -> Path:
    """A copy of a wheel without the members matching regex `drop` (RECORD updated to match)."""
    pattern = re.compile(drop)
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / source.name
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if pattern.search(info.filename):
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [line for line in data.decode().splitlines()
                         if not pattern.search(line.split(",", 1)[0])]
                data = ("\n".join(lines) + "\n").encode()
            dst.writestr(info, data)
    return out


def split_file(source: Path, first: Path, second: Path, first_bytes: int) -> None:
    first.parent.mkdir(parents=True, exist_ok=True)
    second.parent.mkdir(parents=True, exist_ok=True)
    with source.open("rb") as handle:
        first.write_bytes(handle.read(first_bytes))
        second.write_bytes(handle.read())


def join_parts(parts: list[Path], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as handle:
        for part in parts:
            handle.write(part.read_bytes())


# ---- the plan --------------------------------------------------------------------------------


def case_seconds(check: str, variant: str | None) -> float:
    if variant is not None and variant.startswith("compile"):
        return COMPILE_SECONDS
    return GPU_OVER_CPU * CHECK_SECONDS.get(check, DEFAULT_CHECK_SECONDS)


def budget_seconds(points: int, seconds_per_point: float) -> float:
    return points * seconds_per_point


def estimate(phase: Phase, runnable: list[tuple[str, str | None, str | None, str | None]],
             sweep_points: int, seconds_per_point: float) -> float:
    """Wall seconds for a phase: start-up, plus its cases' seconds spread over its workers (a
    budget phase: its sweep points at their worst case, every point to its time cap)."""
    if phase.budgets:
        return PHASE_STARTUP_S + budget_seconds(sweep_points, seconds_per_point)
    work = sum(case_seconds(check, variant) for check, _, variant, _ in runnable)
    return PHASE_STARTUP_S + work / phase.workers
