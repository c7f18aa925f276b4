"""Session state the plugin and the xdist hooks share: whether the suite was asked for, the stash
keys, and the run's selection (models x variants x dtypes), decided once.

Its own module so that plugin.py and gpus.py both import it and neither imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

ASKED = pytest.StashKey[bool]()
SELECTION = pytest.StashKey["Any"]()
USER_MODELS = pytest.StashKey["tuple[Any, ...]"]()

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
# the options of ours whose presence asks for the suite (dest names)
OUR_OPTIONS = ("model", "variant", "option", "device", "dtype", "threads", "xfails_file", "skips_file",
               "conformance_report", "budgets", "baseline")


def decide(config: pytest.Config) -> bool:
    """Whether this run asked for the suite: `--pyargs conformance...`, a path inside the package,
    an option of ours, or a rootdir that is this project. Decided once, before collection and
    before xdist chooses its workers, from the parsed command line."""
    ns = config.known_args_namespace
    given = [str(arg) for arg in getattr(ns, "file_or_dir", None) or []]
    wanted = any(getattr(ns, name, None) not in (None, [], False) for name in OUR_OPTIONS)
    if getattr(ns, "pyargs", False):
        wanted = wanted or any(arg.split("::")[0].split(".")[0] == "conformance" for arg in given)
    for arg in given:
        path = Path(arg.split("::")[0])
        try:
            wanted = wanted or path.resolve().is_relative_to(PACKAGE_DIR)
        except (OSError, ValueError):
            continue
    ours = config.rootpath.resolve() == PROJECT_ROOT and (PROJECT_ROOT / "pyproject.toml").is_file()
    wanted = wanted or ours
    config.stash[ASKED] = wanted
    return wanted


def asked(config: pytest.Config) -> bool:
    """The decision made by decide(); False before it (another project's run)."""
    return config.stash.get(ASKED, False)


def selection(config: pytest.Config) -> Any:
    """Models x variants x dtypes for this run, decided once (imports torch on first use)."""
    if SELECTION in config.stash:
        return config.stash[SELECTION]
    import torch

    from conformance import variants, zoo
    from conformance.cases import Selection
    from conformance.environment import default_device, probe

    torch.set_num_threads(config.getoption("threads") or 1)
    env = probe(config.getoption("device") or default_device())
    models = config.stash.get(USER_MODELS, None) or tuple(zoo.default_zoo())
    chosen, _ = variants.select(config.getoption("variant"))
    dtypes = tuple(config.getoption("dtype")) or (
        ("fp32", "bf16") if env.kind == "cpu" else ("fp16", "bf16", "fp32")
    )
    every_dtype = bool(config.getoption("dtype")) or \
        config.getoption("hypothesis_profile", None) == "nightly"
    config.stash[SELECTION] = Selection(tuple(models), tuple(chosen), dtypes, env, every_dtype)
    return config.stash[SELECTION]
