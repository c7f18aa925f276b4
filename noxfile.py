"""The stack matrix: each session is one library stack the suite must pass on.

    nox -s current legacy --install-only     # set up both stacks
    nox -R -s current legacy -- suite        # the main job: the suite on the shipped models
    nox -R -s current legacy -- tests        # the suite's own tests
"""

from __future__ import annotations

import os

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


def _stack(session: nox.Session, stack: str) -> None:
    session.install(TORCH, *STACKS[stack], "-e", ".[real,dev]")
    env = {"HF_HUB_OFFLINE": "1", "CONFORMANCE_STACK": stack}
    jobs = session.posargs or ["tests", "suite"]
    if "tests" in jobs:
        # -n auto: one xdist worker per core (per GPU on a GPU runner); most self-tests run the
        # suite in a subprocess, so they parallelize well
        session.run("pytest", "tests", "-q", "-p", "no:randomly", "-n", "auto", env=env)
    if "suite" in jobs:
        session.run("pytest", "--pyargs", "conformance", "-q", "-n", "auto",
                    *EXPECTATIONS.get(stack, []), "--conformance-report", f"reports/{stack}", env=env)
    if "false-alarms" in jobs:  # nightly, not CI: unmodified variants, random seeds, 20 runs
        runs = int(os.environ.get("CONFORMANCE_RUNS", "20"))
        for run in range(runs):
            session.run("pytest", "--pyargs", "conformance", "-q", "-p", "no:randomly", "-n", "auto",
                        "--hypothesis-profile", "nightly", "--hypothesis-seed", str(run * 7919 + 1),
                        *EXPECTATIONS.get(stack, []), *FALSE_ALARM_SELECTION,
                        "--conformance-report", f"reports/false-alarms/{stack}/{run}", env=env,
                        success_codes=[0, 1])
        session.run("python", "-m", "conformance.false_alarms", f"reports/false-alarms/{stack}")
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
