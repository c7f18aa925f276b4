"""Keep pytest's rootdir where the user ran pytest when a path option of ours takes a value.

pytest chooses its rootdir and ini file before it loads entry-point plugins, so it does not yet
know that `--conformance-report /abs/dir` takes a value: it counts `/abs/dir` as a test path,
climbs to the common ancestor (often `/`), finds no ini file, and drops the project's `testpaths`
(measured: a run from the project root then collected the self-tests too, 10048 items instead of
9921). Once our options are known (pytest_load_initial_conftests) the choice is made again
without our options' values, the way pytest itself would have made it.
"""

from __future__ import annotations

import inspect
from typing import Any

# the options of ours whose value may be an existing path (pytest would take it for a test path)
PATH_OPTIONS = ("--conformance-report", "--budgets", "--baseline", "--xfails-file", "--skips-file",
                "--model")


def option_values(args: list[str]) -> list[str]:
    """Values given to our path options as separate arguments (`--opt VALUE`)."""
    return [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in PATH_OPTIONS]


def redetermine(config: Any, args: list[str]) -> bool:
    """Re-decide rootdir and ini file without our options' values; True if that changed them.

    Uses pytest's own determine_setup; where this pytest's internals differ from the known ones
    (7.4 to 9.x), nothing changes and `--opt=VALUE` remains the form that always works.
    """
    values = option_values(args)
    ns = config.known_args_namespace
    if not values or getattr(ns, "rootdir", None) or getattr(ns, "inifilename", None):
        return False
    try:
        from _pytest.config.findpaths import determine_setup
    except ImportError:
        return False
    paths = [str(a) for a in getattr(ns, "file_or_dir", []) if str(a) not in values]
    params = inspect.signature(determine_setup).parameters
    kwargs: dict[str, Any] = {"inifile": None, "args": paths, "rootdir_cmd_arg": None,
                              "invocation_dir": config.invocation_params.dir}
    if "override_ini" in params:
        kwargs["override_ini"] = getattr(ns, "override_ini", None)
    try:
        found = determine_setup(**{k: v for k, v in kwargs.items() if k in params})
    except Exception:  # an ini file pytest would itself reject: leave pytest's choice alone
        return False
    rootpath, inipath, inicfg = found[0], found[1], found[2]
    if rootpath == config.rootpath and inipath == config.inipath:
        return False
    ini_attr = "_inicfg" if hasattr(config, "_inicfg") else "inicfg"
    if not all(hasattr(config, name) for name in ("_rootpath", "_inipath", ini_attr)):
        return False
    config._rootpath, config._inipath = rootpath, inipath
    setattr(config, ini_attr, inicfg)
    if hasattr(config, "_inicache"):
        config._inicache.clear()
    if len(found) > 3 and hasattr(config, "_ignored_config_files"):
        config._ignored_config_files = found[3]
    extra = getattr(config._parser, "extra_info", None)
    if isinstance(extra, dict):
        extra.update(rootdir=str(rootpath), inifile=str(inipath))
    if inipath is not None and getattr(ns, "confcutdir", None) is not None:
        ns.confcutdir = str(inipath.parent)
    return True
