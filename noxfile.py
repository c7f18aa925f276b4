"""The stack matrix: each session is one library stack the suite must pass on.

    nox -s current legacy --install-only     # set up both stacks
    nox -R -s current legacy -- suite        # the main job: the suite on the shipped models
    nox -R -s current legacy -- tests        # the suite's own tests

Each stack installs from its lock (locks/<stack>.txt, exact versions), so that a fresh clone
passes any day; `nox -s latest` installs the newest releases unpinned and runs the same jobs
(its new failures are findings to triage, not CI breakage); `nox -s lock` rewrites the locks.
Release work: `nox -s replay` (real regressions, buggy vs fixed release), `nox -s sweep` (every
transformers minor of the declared range), `nox -s bisect -- TEST_ID GOOD BAD`; `nox -s scale`
(the suite on a 0.5 B checkpoint built at run time: wall time, time split, peak memory, loads).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nox

nox.options.default_venv_backend = "virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["current", "legacy"]

# torch is pinned so pip takes the local CPU wheel instead of the CUDA build.
TORCH = os.environ.get("CONFORMANCE_TORCH", "torch==2.13.0")

STACKS: dict[str, list[str]] = {
    # newest transformers 5.x, optimum 2.x, accelerate, bitsandbytes
    "current": ["transformers>=5,<6", "optimum>=2", "accelerate", "bitsandbytes>=0.47"],
    # the last pair with BetterTransformer, reverse_bettertransformer, use_flash_attention_2,
    # load_in_8bit
    "legacy": ["transformers==4.48.3", "optimum==1.27.0", "accelerate<1.5", "bitsandbytes>=0.47",
               # ONNX Runtime through optimum.onnxruntime (C15); transformers 5 has no Optimum for it
               "onnx", "onnxruntime>=1.16"],
    # the declared floor of the supported range: a smoke run only
    "floor": ["transformers==4.36.2", "optimum==1.14.1", "accelerate==0.26.1", "numpy<2"],
}
EXPECTATIONS = {
    "legacy": ["--xfails-file", "fixtures/expectations/legacy-cpu.txt"],
    "current": ["--xfails-file", "fixtures/expectations/current-cpu.txt"],
    "floor": ["--xfails-file", "fixtures/expectations/floor-cpu.txt"],
}


# The false-alarm measurement's selection: the trained decoder (real weights) and an encoder, with
# every variant the stack runs except torch.compile (opt-in, EXT; 43-110 s of compiling per model
# and run on CPU). The nightly profile over this selection took 3-8 min per run on legacy and
# 5.5-18 min on current, on one core of a shared 2-core machine; CONFORMANCE_FALSE_ALARM_MODELS
# widens it (e.g. "tiny-llama-trained bert llama gpt2").
FALSE_ALARM_MODELS = os.environ.get("CONFORMANCE_FALSE_ALARM_MODELS", "tiny-llama-trained bert").split()
FALSE_ALARM_SELECTION = [*(arg for model in FALSE_ALARM_MODELS for arg in ("--model", model)),
                         "-m", "not budget", "-k", "not compile"]


LOCKS = Path(__file__).parent / "locks"


def _install(session: nox.Session, stack: str, locked: bool = True) -> None:
    lock = LOCKS / f"{stack}.txt"
    constraints = ["-c", str(lock)] if locked and lock.exists() else []
    session.install(TORCH, *STACKS[stack], "-e", ".[real,dev]", *constraints)


def _stack(session: nox.Session, stack: str, locked: bool = True) -> None:
    _install(session, stack, locked)
    env = {"HF_HUB_OFFLINE": "1", "CONFORMANCE_STACK": stack}
    jobs = session.posargs or ["tests", "suite"]
    if "tests" in jobs:
        # -n auto: one xdist worker per core (per GPU on a GPU runner); most self-tests run the
        # suite in a subprocess, so they parallelize well
        # --durations: the slowest self-tests in CI's log, to keep CI within its time budget
        session.run("pytest", "tests", "-q", "-p", "no:randomly", "-n", "auto", "--durations=15",
                    env=env)
    if "suite" in jobs:
        session.run("pytest", "--pyargs", "conformance", "-q", "-n", "auto",
                    *EXPECTATIONS.get(stack, []), "--conformance-report", f"reports/{stack}", env=env)
    if "false-alarms" in jobs:  # nightly, not CI: unmodified variants, random seeds, 20 runs
        runs = int(os.environ.get("CONFORMANCE_RUNS", "20"))
        first = int(os.environ.get("CONFORMANCE_FIRST_RUN", "0"))  # resume a series cut short
        for run in range(first, first + runs):
            session.run("pytest", "--pyargs", "conformance", "-q", "-p", "no:randomly", "-n", "auto",
                        "--hypothesis-profile", "nightly", "--hypothesis-seed", str(run * 7919 + 1),
                        *EXPECTATIONS.get(stack, []), *FALSE_ALARM_SELECTION,
                        "--conformance-report", f"reports/false-alarms/{stack}/{run}", env=env,
                        success_codes=[0, 1])
        session.run("python", "-m", "conformance.reporting.false_alarms", f"reports/false-alarms/{stack}",
                    "--ledger", f"docs/false-alarms/{stack}.tsv")
    if "smoke" in jobs:
        session.run("pytest", "--pyargs", "conformance", "-q", "-m", "smoke",
                    *EXPECTATIONS.get(stack, []), env=env)


@nox.session
def current(session: nox.Session) -> None:
    """Newest torch / transformers 5.x / optimum 2.x / accelerate / bitsandbytes."""
    _stack(session, "current")


@nox.session
def legacy(session: nox.Session) -> None:
    """transformers 4.48.x + optimum 1.27: BetterTransformer and the guides' 2023 spellings."""
    _stack(session, "legacy")


@nox.session
def floor(session: nox.Session) -> None:
    """The declared floor of the supported range: collection plus one model through each variant."""
    _stack(session, "floor")


@nox.session
def latest(session: nox.Session) -> None:
    """The current stack's packages unpinned (newest releases): a watch, not CI. Its failures are
    findings to triage (an expectation entry, a fix, or a finding in docs/findings.md)."""
    _stack(session, "current", locked=False)


@nox.session
def scale(session: nox.Session) -> None:
    """The scale benchmark, not CI: a 0.5 B decoder built at run time, the suite run on it as a
    user would (conformance/measure/scale.py); wall time, time split, peak RSS and loads in
    reports/scale/scale.json. `nox -s scale -- PYTEST ARGS` replaces its selection."""
    _install(session, "current")
    session.run("python", "-m", "conformance.measure.scale", "--workdir",
                os.environ.get("CONFORMANCE_SCALE_DIR", str(Path(session.create_tmp()) / "scale")),
                "--out", "reports/scale", "--", *session.posargs, success_codes=[0, 1])


@nox.session(venv_backend="virtualenv")
def lock(session: nox.Session) -> None:
    """Rewrite locks/<stack>.txt from a fresh unpinned install of each stack (torch stays pinned
    by TORCH, since its wheel differs between CPU and GPU machines)."""
    for stack in session.posargs or ["current", "legacy", "floor"]:
        session.install(TORCH, *STACKS[stack], "-e", ".[real,dev]")
        frozen = session.run("pip", "freeze", "--exclude-editable", silent=True) or ""
        kept = [line for line in frozen.splitlines()
                if line and not line.startswith(("-e ", "hf-inference-conformance", "torch=="))]
        LOCKS.mkdir(exist_ok=True)
        (LOCKS / f"{stack}.txt").write_text("\n".join(sorted(kept, key=str.lower)) + "\n")
        session.log(f"locks/{stack}.txt: {len(kept)} packages")
        session.run("pip", "uninstall", "-y", "-q", *[line.split("==")[0] for line in kept])


# --- release work: replay of real regressions, the release sweep, bisect -------------------------

# Each replay case: a real upstream regression, a pair of releases (buggy, fixed), the zoo model it
# needs and the one check (pytest -k) that must fail on the buggy release and pass on the fixed.
REPLAY = json.loads((Path(__file__).parent / "fixtures" / "replay.json").read_text())
# The companions each transformers line installs beside (the sweep's table): the newest optimum /
# accelerate that still install with it; bitsandbytes only where its CPU backend imports.
SWEEP = json.loads((Path(__file__).parent / "fixtures" / "sweep.json").read_text())
SWEEP_SELECTION = ["--model", "llama", "--model", "bert", "--model", "mistral",
                   "--model", "tiny-llama-trained", "-m", "not budget", "-p", "no:randomly",
                   "--hypothesis-profile", "ci"]


def _release(session: nox.Session, transformers: str) -> None:
    """Install one transformers release with the companions the sweep table names for its line.
    --upgrade: one venv serves every release in turn, and an unpinned companion (`default`:
    the newest accelerate) would otherwise keep the older pin of the line installed before it
    (measured: 4.53-5.24 swept with 4.52's accelerate 1.7.0, whose balanced plans fail)."""
    minor = ".".join(transformers.split(".")[:2])
    companions = SWEEP.get(minor, SWEEP["default"])
    session.install("--upgrade", TORCH, f"transformers=={transformers}", *companions, "-e", ".[dev]")


def _run_selection(session: nox.Session, report: str, *args: str) -> None:
    env = {"HF_HUB_OFFLINE": "1", "CI": "1"}
    session.run("pytest", "--pyargs", "conformance", "-q", *args, f"--conformance-report={report}",
                env=env, success_codes=[0, 1, 5])


@nox.session
def replay(session: nox.Session) -> None:
    """Every case of fixtures/replay.json: the named check fails on the buggy release and passes on
    the fixed one. `nox -s replay -- CASE ...` runs only those."""
    chosen = [c for c in REPLAY["cases"] if not session.posargs or c["case"] in session.posargs]
    for case in chosen:
        for role in ("buggy", "fixed"):
            _release(session, case[role])
            out = f"reports/replay/{case['case']}/{role}"
            model = case["model"]
            if model.endswith(".json"):  # a replay-only config (fixtures/replay/): built per release
                session.run("python", "-m", "conformance.releases", "materialize", model, f"{out}/model")
                model = f"{out}/model/{Path(model).stem}"
            _run_selection(session, out, "--model", model,
                           "--variant", case["variant"], "--dtype", "fp32", "-k", case["check"],
                           "-p", "no:randomly", "--hypothesis-profile", "ci",
                           # float64 causal masks on transformers 4.x (the golden run of ALiBi)
                           "-p", "conformance.releases")
    session.run("python", "-m", "conformance.releases", "replay", "fixtures/replay.json",
                "reports/replay", *[c["case"] for c in chosen])


@nox.session
def sweep(session: nox.Session) -> None:
    """The latest patch of every transformers minor of the declared range through a fast
    selection; one row per release (reports/sweep/<release>/). Nightly, not CI."""
    releases = session.posargs or SWEEP["releases"]
    for release in releases:
        _release(session, release)
        _run_selection(session, f"reports/sweep/{release}", *SWEEP_SELECTION)
    session.run("python", "-m", "conformance.releases", "sweep", "reports/sweep", *releases)


@nox.session
def bisect(session: nox.Session) -> None:
    """`nox -s bisect -- TEST_ID GOOD BAD`: the first release between GOOD and BAD (transformers
    versions from the sweep table's list) on which TEST_ID fails."""
    if len(session.posargs) != 3:
        session.error("usage: nox -s bisect -- TEST_ID GOOD BAD")
    test_id, good, bad = session.posargs
    from packaging.version import Version

    known = sorted({*SWEEP["releases"], *SWEEP.get("bisect_extra", []), good, bad}, key=Version)
    span = [r for r in known if Version(good) <= Version(r) <= Version(bad)]
    lo, hi = 0, len(span) - 1  # span[lo] passes, span[hi] fails (checked first)

    def fails(release: str) -> bool:
        _release(session, release)
        out = f"reports/bisect/{release}"
        _run_selection(session, out, "-k", test_id, "-p", "no:randomly", "--hypothesis-profile", "ci")
        results = json.loads((Path(out) / "report.json").read_text())["results"]
        return any(r["outcome"] in ("failed", "error") for r in results)

    if fails(span[lo]) or not fails(span[hi]):
        session.error(f"{test_id}: GOOD {good} must pass and BAD {bad} must fail")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fails(span[mid]) else (mid, hi)
    session.log(f"first bad release for {test_id}: transformers {span[hi]} (last good {span[lo]})")
