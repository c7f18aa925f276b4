"""Spreading a run over GPUs with xdist: one worker per GPU, each pinned to its own, tested on a
CPU machine with a faked GPU count (CONFORMANCE_FAKE_GPU_COUNT, read only by gpus.visible_gpus)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conformance import gpus

# each test in the pytester run writes down which worker it ran in and what GPU it was given
RECORDING_TEST = """
import json, os, sys

def test_where(tmp_path_factory):
    out = os.environ["RECORD_DIR"]
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(out, worker + ".json"), "w") as f:
        json.dump({"cvd": os.environ.get("CUDA_VISIBLE_DEVICES")}, f)

import pytest

@pytest.mark.multi_gpu(2)
def test_needs_two_gpus():
    pass
"""


def test_assignment_is_one_gpu_per_worker_then_round_robin() -> None:
    visible = ["0", "1", "2"]
    assert [gpus.assignment(f"gw{i}", visible) for i in range(5)] == ["0", "1", "2", "0", "1"]
    assert gpus.assignment("gw0", []) is None
    with pytest.raises(ValueError, match="unexpected xdist worker id"):
        gpus.worker_index("main")


def test_tests_are_grouped_by_the_model_they_are_about() -> None:
    """-n keeps each model's tests on one worker: the scope is the model named in the id."""
    models = ["llama", "tiny-llama-trained", "bert"]
    suite = "conformance/suite/test_logits.py::test_logits"
    assert gpus.model_scope(f"{suite}[tiny-llama-trained-sdpa-fp32-nopad]", models) == \
        "tiny-llama-trained"
    assert gpus.model_scope(f"{suite}[llama-sdpa-fp32-nopad]", models) == "llama"
    assert gpus.model_scope("x.py::test_device_map_plan[bert-eager-bf16-balanced]", models) == "bert"
    assert gpus.model_scope("tests/test_units.py::test_masks", models) is None
    assert gpus.model_scope("x.py::test_y[llamas-eager]", models) is None


@pytest.mark.parametrize(("fake", "cvd", "expected"), [
    ("3", None, ["0", "1", "2"]),
    ("2", "5,7", ["5", "7"]),
    ("1", "GPU-aa,GPU-bb", ["GPU-aa"]),
    ("0", None, []),
    ("2", "-1", ["0", "1"]),
])
def test_visible_gpus_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch, fake: str,
                                                  cvd: str | None, expected: list[str]) -> None:
    monkeypatch.setenv(gpus.FAKE_GPU_COUNT, fake)
    if cvd is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cvd)
    assert gpus.visible_gpus() == expected


def test_auto_workers_is_the_gpu_count_else_xdists_choice(pytester: pytest.Pytester,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    config = pytester.parseconfig()
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv(gpus.FAKE_GPU_COUNT, "4")
    assert gpus.XdistHooks().pytest_xdist_auto_num_workers(config) == 4
    monkeypatch.setenv(gpus.FAKE_GPU_COUNT, "0")
    fresh = pytester.parseconfig()
    assert gpus.XdistHooks().pytest_xdist_auto_num_workers(fresh) is None  # xdist counts CPU cores
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "3")  # the user's choice wins
    assert gpus.XdistHooks().pytest_xdist_auto_num_workers(pytester.parseconfig()) is None


def test_pin_respects_explicit_device_and_refuses_after_cuda_init(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored after the test
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    record = gpus.pin_worker({"workerid": "gw1", "workercount": 2, gpus.GPU_LIST: ["4", "6"]}, "cuda:1")
    assert record["pinned_to"] is None and "--device cuda:1" in record["why_not"]
    record = gpus.pin_worker({"workerid": "gw1", "workercount": 2, gpus.GPU_LIST: []}, None)
    assert record["pinned_to"] is None and record["why_not"] == "no GPU visible"
    workerinput = {"workerid": "gw1", "workercount": 3, gpus.GPU_LIST: ["4", "6"]}
    if torch.cuda.is_initialized():  # too late to pin this process: a clear refusal
        with pytest.raises(pytest.UsageError, match="CUDA was initialized before"):
            gpus.pin_worker(workerinput, None)
        return
    record = gpus.pin_worker(workerinput, None)
    assert record["pinned_to"] == "6" and record["gpu_shared_by_workers"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"


@pytest.fixture
def xdist_run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    pytester.makepyfile(test_where=RECORDING_TEST)
    record_dir = tmp_path / "where"
    record_dir.mkdir()
    monkeypatch.setenv("RECORD_DIR", str(record_dir))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    # these self-tests may themselves run in an xdist worker: the subprocess is not one
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)

    def run(fake: str, *args: str) -> tuple[pytest.RunResult, dict[str, Any]]:
        monkeypatch.setenv(gpus.FAKE_GPU_COUNT, fake)
        result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider",
                                               "-rs", *args, timeout=300)
        seen = {p.stem: json.loads(p.read_text()) for p in record_dir.glob("*.json")}
        return result, seen

    return run


def test_n_auto_starts_one_worker_per_gpu_each_pinned(xdist_run: Any, tmp_path: Path) -> None:
    """-n auto with 3 (faked) GPUs: 3 workers, gwN sees only GPU N, recorded in header and report."""
    report = tmp_path / "report"
    result, seen = xdist_run("3", "-n", "auto", "-p", "xdist", "--conformance-report", str(report))
    text = result.stdout.str()
    assert "conformance xdist: 3 workers pinned by CUDA_VISIBLE_DEVICES: gw0->GPU 0, gw1->GPU 1, " \
           "gw2->GPU 2" in text, text
    # the test ran in some worker(s); every worker that ran it saw exactly its own GPU
    assert seen and all(v["cvd"] == k.removeprefix("gw") for k, v in seen.items()), seen
    body = json.loads((report / "report.json").read_text())
    workers = body["environment"]["xdist_workers"]
    assert sorted(workers) == ["gw0", "gw1", "gw2"]
    for workerid, pin in workers.items():
        assert pin["pinned_to"] == workerid.removeprefix("gw")
        assert pin["cuda_visible_devices"] == pin["pinned_to"]
        assert pin["torch_imported_before_pinning"] is False
    # a check needing two GPUs at once is skipped in a pinned worker, naming the serial phase
    assert "is pinned to one: run the serial phase `pytest --pyargs conformance -m multi_gpu " \
           "-p no:xdist`" in text
    result.assert_outcomes(passed=1, skipped=1)


def test_multi_gpu_checks_skip_below_their_gpu_count_serially(xdist_run: Any) -> None:
    """Serially the real GPU count decides (never the faked one): none here, so a skip with why."""
    have = gpus.gpu_count()
    if have >= 2:
        pytest.skip(f"{have} GPUs here: the multi_gpu check runs instead of skipping")
    # an option of ours asks for the suite (elsewhere the plugin stays quiet: test_plugin.py)
    result, seen = xdist_run("4", "-p", "no:xdist", "--threads", "1")
    result.assert_outcomes(passed=1, skipped=1)
    assert f"needs 2 CUDA GPUs (visible: {have}): run on a multi-GPU runner" in result.stdout.str()
    assert seen == {"main": {"cvd": None}}
