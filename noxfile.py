"""The stack matrix: each session is one library stack the suite must pass on.

`nox -s current legacy` sets both up from a clean checkout and runs the README's commands.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "virtualenv"
nox.options.reuse_existing_virtualenvs = True

# torch is pinned so pip takes the local CPU wheel instead of the CUDA build.
TORCH = os.environ.get("CONFORMANCE_TORCH", "torch==2.13.0")

STACKS: dict[str, list[str]] = {
    # newest transformers 5.x, optimum 2.x, accelerate, bitsandbytes
    "current": ["transformers>=5,<6", "optimum>=2", "accelerate", "bitsandbytes>=0.47"],
    # the last pair with BetterTransformer, reverse_bettertransformer, use_flash_attention_2, load_in_8bit
    "legacy": ["transformers==4.48.3", "optimum==1.27.0", "accelerate<1.5", "bitsandbytes>=0.47"],
    # the declared floor: smoke run only
    "floor": ["transformers==4.36.2", "optimum==1.14.1", "accelerate==0.26.1", "numpy<2"],
}


def _install(session: nox.Session, stack: str) -> None:
    session.install(TORCH, *STACKS[stack], "-e", ".[real,dev]")


def _run(session: nox.Session, stack: str) -> None:
    env = {"HF_HUB_OFFLINE": "1", "CONFORMANCE_STACK": stack}
    report = f"reports/{stack}"
    # the suite's own tests
    session.run("pytest", "tests", "-q", env=env)
    # the main job: the conformance suite on the shipped default models
    session.run("pytest", "--pyargs", "conformance", "-q", "--conformance-report", report, env=env)


@nox.session(name="current")
def current(session: nox.Session) -> None:
    """Newest torch / transformers 5.x / optimum 2.x / accelerate / bitsandbytes."""
    _install(session, "current")
    _run(session, "current")


@nox.session(name="legacy")
def legacy(session: nox.Session) -> None:
    """transformers 4.48.x + optimum 1.27: BetterTransformer and the guides' 2023 spellings."""
    _install(session, "legacy")
    _run(session, "legacy")


@nox.session(name="floor")
def floor(session: nox.Session) -> None:
    """The declared floor of the supported range: collection plus a smoke run."""
    _install(session, "floor")
    env = {"HF_HUB_OFFLINE": "1", "CONFORMANCE_STACK": "floor"}
    session.run("pytest", "--pyargs", "conformance", "-q", "-m", "smoke", env=env)
