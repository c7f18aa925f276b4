"""Spreading a run over the GPUs of a multi-GPU runner, and checks that need several GPUs.

``pytest -n auto`` starts one xdist worker per visible GPU (not per CPU core) and pins each to
its own GPU: the controller sends the list of visible GPUs, and each worker sets
``CUDA_VISIBLE_DEVICES`` to its own entry (gw0 -> the first, gw1 -> the second, ...) in
``pytest_configure``, before torch initializes CUDA. So ``cuda:0`` in a worker is its own GPU.

Checks marked ``multi_gpu(n)`` need n GPUs at once. They cannot run in a worker pinned to one
GPU: there they skip, saying to run them in the serial phase (``-m multi_gpu -p no:xdist``).

With ``-n``, tests are grouped by model: each model's tests run on one worker, which loads
the model once.

Loaded as a plugin by ``conformance.plugin`` (``pytest_plugins``). The xdist hooks are optional
hooks, so the module also works without xdist (or with ``-p no:xdist``).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

from conformance.session import asked, selection

# Self-tests only: pretend this many GPUs are visible (the assignment is tested on CPU machines).
FAKE_GPU_COUNT = "CONFORMANCE_FAKE_GPU_COUNT"
GPU_LIST = "conformance_gpus"  # workerinput key: the controller's visible GPUs
PIN = "conformance_pin"  # workeroutput key: what a worker did
SERIAL_PHASE = "pytest --pyargs conformance -m multi_gpu -p no:xdist"
VISIBLE = pytest.StashKey["list[str]"]()
PINS = pytest.StashKey["dict[str, dict[str, Any]]"]()


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries (indices or UUIDs).

    With CUDA_VISIBLE_DEVICES set, its entries (as many as torch counts); else 0..count-1.
    """
    fake = os.environ.get(FAKE_GPU_COUNT)
    if fake is not None:
        count = int(fake)
    else:
        try:
            import torch
        except ImportError:
            return []
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and listed.strip() not in ("", "-1"):
        entries = [e.strip() for e in listed.split(",") if e.strip()]
        return entries[:count]
    return [str(i) for i in range(count)]


def worker_index(workerid: str) -> int:
    """gw0 -> 0, gw7 -> 7."""
    digits = workerid.removeprefix("gw")
    if not digits.isdigit():
        raise ValueError(f"unexpected xdist worker id {workerid!r}")
    return int(digits)


def assignment(workerid: str, gpus: list[str]) -> str | None:
    """The GPU a worker is pinned to: its own when there are enough, round-robin otherwise."""
    if not gpus:
        return None
    return gpus[worker_index(workerid) % len(gpus)]


def pin_worker(workerinput: dict[str, Any], device_option: str | None) -> dict[str, Any]:
    """Set CUDA_VISIBLE_DEVICES for this worker; what was done, for the report."""
    workerid = workerinput.get("workerid", "?")
    gpus = workerinput.get(GPU_LIST)
    record: dict[str, Any] = {"worker": workerid, "gpus_seen_by_controller": gpus,
                              "torch_imported_before_pinning": "torch" in sys.modules}
    if gpus is None:
        record["pinned_to"], record["why_not"] = None, "the controller sent no GPU list"
    elif not gpus:
        record["pinned_to"], record["why_not"] = None, "no GPU visible"
    elif device_option is not None and device_option not in ("cuda", "cuda:0"):
        record["pinned_to"], record["why_not"] = None, f"--device {device_option} names the device"
    else:
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
            raise pytest.UsageError(f"xdist worker {workerid}: CUDA was initialized before the "
                                    "worker could be pinned to its GPU")
        record["pinned_to"] = assignment(workerid, gpus)
        record["gpu_shared_by_workers"] = int(workerinput.get("workercount", 1)) > len(gpus)
        os.environ["CUDA_VISIBLE_DEVICES"] = record["pinned_to"]
    record["cuda_visible_devices"] = os.environ.get("CUDA_VISIBLE_DEVICES")
    return record


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if not asked(config):
        return
    config.addinivalue_line(
        "markers", f"multi_gpu(n=2): needs n CUDA GPUs at once; runs in the serial phase ({SERIAL_PHASE})")
    workerinput = getattr(config, "workerinput", None)
    if workerinput is None:
        return
    record = pin_worker(workerinput, config.getoption("device", None))
    config.stash[PINS] = {record["worker"]: record}
    config.workeroutput[PIN] = record  # type: ignore[attr-defined]


def _visible(config: pytest.Config) -> list[str]:
    if VISIBLE not in config.stash:
        config.stash[VISIBLE] = visible_gpus()
    return config.stash[VISIBLE]


def model_scope(nodeid: str, models: list[str]) -> str | None:
    """The model a test id is about ("test_logits[tiny-llama-trained-sdpa-fp32]" ->
    "tiny-llama-trained"), or None for a test that is about no model."""
    param = nodeid.partition("[")[2]
    for name in sorted(models, key=len, reverse=True):
        if param.startswith((name + "-", name + "]")):
            return name
    return None


class XdistHooks:
    """The xdist hooks, registered only when xdist is installed and the suite was asked for (as
    pytest-randomly does): another project's `-n auto` keeps xdist's own choice."""

    @pytest.hookimpl(tryfirst=True, optionalhook=True)
    def pytest_xdist_auto_num_workers(self, config: pytest.Config) -> int | None:
        """-n auto: one worker per visible GPU; without GPUs, xdist's own choice (CPU cores)."""
        if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
            return None  # the user's explicit choice, honoured by xdist's own hook
        count = len(_visible(config))
        return count or None

    @pytest.hookimpl(tryfirst=True, optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        """--dist load (what -n implies): every test of one model goes to the same worker.

        Each worker then loads each model (and computes its golden outputs) once, as a serial run
        does; plain load scheduling interleaves models, and each switch empties the model cache.
        Any other --dist mode is xdist's own.
        """
        if config.getoption("dist", None) != "load":
            return None
        from xdist.scheduler import LoadScopeScheduling

        models = [model.name for model in selection(config).models]

        class ModelScheduling(LoadScopeScheduling):  # type: ignore[misc]
            def _split_scope(self, nodeid: str) -> str:
                return model_scope(nodeid, models) or super()._split_scope(nodeid)

        return ModelScheduling(config, log)

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """Controller side: tell each worker which GPUs there are before it starts."""
        node.workerinput[GPU_LIST] = _visible(node.config)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        record = getattr(node, "workeroutput", {}).get(PIN)
        if record is not None:
            node.config.stash.setdefault(PINS, {})[record["worker"]] = record


def register_xdist_hooks(config: pytest.Config) -> None:
    manager = config.pluginmanager
    if manager.hasplugin("xdist") and manager.get_plugin("conformance-xdist") is None:
        config.pluginmanager.register(XdistHooks(), "conformance-xdist")


def worker_pins(config: pytest.Config) -> dict[str, dict[str, Any]]:
    """Which worker ran on which GPU (controller: all workers, once they are done)."""
    return dict(sorted(config.stash.get(PINS, {}).items()))


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not asked(config):
        return []
    workers = getattr(config.option, "numprocesses", None)
    if not workers or getattr(config.option, "dist", "no") == "no":
        return []
    gpus = _visible(config)
    if not gpus:
        return [f"conformance xdist: {workers} workers, no GPU visible: not pinned"]
    plan = ", ".join(f"gw{i}->GPU {assignment(f'gw{i}', gpus)}" for i in range(int(workers)))
    return [f"conformance xdist: {workers} workers pinned by CUDA_VISIBLE_DEVICES: {plan}"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """multi_gpu(n) checks skip, with the reason, in a pinned worker or below n GPUs."""
    if not asked(config):
        return
    wanted = [(item, item.get_closest_marker("multi_gpu")) for item in items]
    wanted = [(item, marker) for item, marker in wanted if marker is not None]
    if not wanted:
        return
    worker = getattr(config, "workerinput", None)
    pinned = worker is not None and any(
        record.get("pinned_to") is not None for record in config.stash.get(PINS, {}).values())
    for item, marker in wanted:
        need = int(marker.args[0] if marker.args else marker.kwargs.get("n", 2))
        if pinned:
            item.add_marker(pytest.mark.skip(reason=(
                f"needs {need} GPUs at once, and xdist worker {worker.get('workerid')} is pinned to "
                f"one: run the serial phase `{SERIAL_PHASE}`")))
            continue
        have = gpu_count()
        if have < need:
            from conformance.outcomes import not_applicable

            item.add_marker(pytest.mark.skip(reason=not_applicable(
                f"needs {need} CUDA GPUs (visible: {have}): run on a multi-GPU runner, "
                f"serial phase `{SERIAL_PHASE}`")))


def gpu_count() -> int:
    """CUDA GPUs torch can use here (never faked: checks that need GPUs run on real ones)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
