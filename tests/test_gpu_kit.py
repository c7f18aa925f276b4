"""The GPU kit (gpu/run, conformance/gpukit.py) cannot rot between GPU runs: its plan, what it
carries, its refusals and its pieces are checked here, on CPU."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import pytest

from conformance import gpukit

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "gpu" / "run"


def _gpu_run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, str(RUN), *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


def _script() -> types.ModuleType:
    loader = importlib.machinery.SourceFileLoader("gpu_run", str(RUN))
    spec = importlib.util.spec_from_loader("gpu_run", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _transformers_major() -> int:
    from importlib.metadata import version

    return int(version("transformers").split(".")[0])


def test_plan_fits_the_lease() -> None:
    """The dry run counts every phase's cases under a planned H200 and each call fits 6 minutes;
    every phase selects something (a renamed check or variant would silently select nothing)."""
    if _transformers_major() < 5:
        pytest.skip("the lent machine runs transformers 5.x: the plan is for the current stack")
    done = _gpu_run("--plan")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    for phase in gpukit.PHASES:
        line = next(x for x in out.splitlines() if f"phase {phase.name}:" in x)
        assert not line.split(f"phase {phase.name}: ")[1].startswith("0 cases run"), line
    assert out.count("(fits)") == 2, out


def test_what_travels_fits_each_call() -> None:
    """The manifest's carried files (written by --fetch) plus today's working tree stay under
    64 MiB a call, and every pin travels: whole, or in parts that add up to its wheel."""
    data = gpukit.manifest()
    assert gpukit.size_problems(data, gpukit.tree_bytes()) == []
    carried = data["carried"]
    for pin in data["pins"]:
        name = pin["pin"].split("==")[0].replace("-", "_").lower()
        items = [c for c in carried if c["wheel"].lower().startswith(name + "-")]
        assert items, f"{pin['pin']} is not carried: run gpu/run --fetch"
        if pin.get("split"):
            assert sorted(c["part"] for c in items) == [1, 2]
            assert {c["call"] for c in items} == {1, 2}
    done = _gpu_run("--check-sizes")
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_cuda_is_one_line_and_exit_4(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    done = _gpu_run("--call", "1", str(tmp_path / "out"))
    assert done.returncode == gpukit.EXIT_UNUSABLE
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], lines


def test_missing_wheel_is_one_line_naming_it_and_fetch(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(gpukit, "WHEELS", tmp_path / ".whl")
    monkeypatch.setattr(gpukit, "STAGE", tmp_path / "stage")
    problem = _script().install_call(1)
    assert problem is not None and "is missing" in problem and gpukit.FETCH in problem
    first = next(c for c in gpukit.manifest()["carried"] if c["call"] == 1)
    assert first["file"] in problem


def test_call_2_without_call_1_says_so(tmp_path: Path, monkeypatch: Any) -> None:
    """Call 2 joins a part that call 1 staged: on a fresh machine it says to run call 1 again."""
    data = gpukit.manifest()
    wheels = tmp_path / ".whl"
    for item in data["carried"]:
        if item["call"] == 2:  # right-sized stand-ins: only their presence and size are read
            path = gpukit.carried_path(item, wheels)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as handle:
                handle.truncate(item["size"])
    monkeypatch.setattr(gpukit, "WHEELS", wheels)
    monkeypatch.setattr(gpukit, "STAGE", tmp_path / "stage")
    problem = _script().install_call(2)
    assert problem is not None and "gpu/run --call 1" in problem, problem


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    record = "".join(f"{name},sha256=x,{len(data)}\n" for name, data in members.items())
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in members.items():
            wheel.writestr(name, data)
        wheel.writestr("pkg-1.0.dist-info/RECORD", record)
    return path


def test_trim_drops_members_and_their_record_lines(tmp_path: Path) -> None:
    source = _wheel(tmp_path / "pkg-1.0-py3-none-any.whl",
                    {"pkg/__init__.py": b"", "pkg/lib_cuda118.so": b"x" * 100, "pkg/lib_cuda130.so": b"y"})
    out = gpukit.trim_wheel(source, tmp_path / "out", r"^pkg/lib_cuda11[0-9]\.so$")
    with zipfile.ZipFile(out) as wheel:
        names = set(wheel.namelist())
        record = wheel.read("pkg-1.0.dist-info/RECORD").decode()
    assert names == {"pkg/__init__.py", "pkg/lib_cuda130.so", "pkg-1.0.dist-info/RECORD"}
    assert "cuda118" not in record and "cuda130" in record


def test_split_and_join_give_back_the_same_bytes(tmp_path: Path) -> None:
    source = tmp_path / "big.whl"
    source.write_bytes(bytes(range(256)) * 1000)
    first, second = tmp_path / "a" / "big.part1", tmp_path / "b" / "big.part2"
    gpukit.split_file(source, first, second, 77_777)
    assert first.stat().st_size == 77_777
    gpukit.join_parts([first, second], tmp_path / "joined.whl")
    assert gpukit.sha256(tmp_path / "joined.whl") == gpukit.sha256(source)


def test_rules_select_by_check_model_variant_and_dtype() -> None:
    rule = gpukit.Rule(("logits",), variants=("sdpa*",), models=("llama",), dtypes=("bf16",),
                       not_variants=("*fa4*",))
    assert rule.matches("logits", "llama", "sdpa_flash", "bf16")
    assert not rule.matches("logits", "llama", "sdpa_flash", "fp16")
    assert not rule.matches("logits", "bert", "sdpa_flash", "bf16")
    assert not rule.matches("padding_invariance", "llama", "sdpa_flash", "bf16")
    assert not rule.matches("logits", None, None, None)  # a whole-run item: only wildcards take it
    assert gpukit.Rule(("*refuses*",)).matches("fa2_refuses_what_it_cannot_run", None, None, None)
    assert not gpukit.Rule(("*",), not_variants=("*fa4*",)).matches("logits", "llama", "bnb_nf4+fa4", "bf16")


def test_plan_estimate_spreads_cases_over_workers() -> None:
    checks = gpukit.Phase("x", 1, (), workers=4)
    rows = [("logits", "llama", "sdpa", "bf16")] * 8
    assert gpukit.estimate(checks, rows, 0, 10.0) == pytest.approx(
        gpukit.PHASE_STARTUP_S + 8 * gpukit.GPU_OVER_CPU * gpukit.CHECK_SECONDS["logits"] / 4)
    sweep = gpukit.Phase("y", 1, (), budgets=True)
    assert gpukit.estimate(sweep, [], 12, 10.0) == pytest.approx(gpukit.PHASE_STARTUP_S + 120.0)


def test_planned_device_runs_nothing(tmp_path: Path) -> None:
    """Under the planned device the suite collects, and refuses to run a single test."""
    import os

    env = {**os.environ, "CONFORMANCE_PLAN_DEVICE": gpukit.PLANNED_DEVICE, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "conformance", "--device", "cuda",
                           "--model", "llama", "--variant", "eager", "-q"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 4, done.stdout + done.stderr
    assert "works with --collect-only alone" in done.stdout + done.stderr


def test_kernel_scale_model_is_named_not_in_the_zoo() -> None:
    from conformance import zoo

    assert "kernel-llama" not in {m.name for m in zoo.default_zoo()}
    model = zoo.resolve("kernel-llama", zoo.default_zoo())
    config = json.loads(Path(model.location).read_text())
    assert model.kind == "decoder" and config["hidden_size"] == 2048 and config["head_dim"] == 128


class _FakeInterface(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("flash_attn.cute.interface")
        self.calls = 0

        def forward(*args: Any, **kwargs: Any) -> str:
            self.calls += 1
            return "out"

        self._flash_attn_fwd = forward


def test_fa4_proof_counts_forward_entries_and_forbids_other_paths(monkeypatch: Any) -> None:
    """FA4's kernels are no torch ops: the proof counts calls of its forward entry made during the
    measured forward, and fails when fewer than the model's layers reached it."""
    from conformance import fa4
    from conformance.variants import REGISTRY

    fake = _FakeInterface()
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", types.ModuleType("flash_attn.cute"))
    monkeypatch.setitem(sys.modules, fa4.ENTRY_MODULE, fake)
    proof = REGISTRY["fa4"].proof_for("decoder")
    model = types.SimpleNamespace(config=types.SimpleNamespace(num_hidden_layers=2))
    counter = proof.probe()
    with counter:
        for _ in range(2):
            sys.modules[fa4.ENTRY_MODULE]._flash_attn_fwd()
    problem, figures = proof.verdict(counter, model)
    assert problem is None and figures["proof_ops"] == {fa4.CALLS: 2}
    assert fake._flash_attn_fwd.__name__ == "forward"  # the entry is restored after the forward
    counter = proof.probe()
    with counter:
        sys.modules[fa4.ENTRY_MODULE]._flash_attn_fwd()
    problem, _ = proof.verdict(counter, model)
    assert problem is not None and "did not run" in problem

    import torch

    counter = proof.probe()
    with counter:
        for _ in range(2):
            fake._flash_attn_fwd()
        q = torch.ones(1, 1, 2, 4)
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    problem, _ = proof.verdict(counter, model)
    assert problem is not None and "plain path ran alongside" in problem
