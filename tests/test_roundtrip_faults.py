"""The round-trip checks catch their planted faults (healthy twins pass the same run), and a
damaged user checkpoint fails in one line naming the damage while the next tests still run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

# imported before any pytester test takes its sys.modules snapshot: _damaged_checkpoints builds
# the llama in this process, and a modeling module first imported inside a pytester test is
# dropped again at its end, after which scipy's extensions (loaded by transformers' losses)
# refuse a second load ("cannot load module more than once per process"); which worker imported
# it first depended on test order
import transformers.models.llama.modeling_llama  # noqa: F401
from faults_roundtrip import FAULTS, RoundtripFault

from conftest import DETECTIONS, assert_caught, run_fault


def _report(pytester: pytest.Pytester, run_suite: Any, *args: str) -> list[dict[str, Any]]:
    out = pytester.path / "report"
    run_suite("-p", "faults_roundtrip", "--pyargs", "conformance", "-q",
              "--conformance-report", str(out), *args)
    return json.loads((out / "report.json").read_text())["results"]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.variant.id for f in FAULTS])
def test_roundtrip_fault_is_caught(pytester: pytest.Pytester, run_suite: Any,
                                   fault: RoundtripFault) -> None:
    assert_caught(fault, run_fault(pytester, run_suite, "faults_roundtrip", fault))


def _damaged_checkpoints(root: Path) -> dict[str, Path]:
    """The zoo llama saved sharded, once per damage the suite knows, each damaged."""
    from conformance import roundtrip, zoo

    llama = next(m for m in zoo.default_zoo() if m.name == "llama")
    model = zoo.auto_class(llama.kind).from_pretrained(zoo.materialize(llama, root / "zoo"))
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    out = {}
    for damage, (plant, _) in roundtrip.DAMAGES.items():
        path = root / f"llama-{damage}"
        model.save_pretrained(str(path), max_shard_size=total // 4)
        plant(path)
        out[damage] = path
    return out


def test_damaged_user_checkpoint_fails_in_one_line(pytester: pytest.Pytester, run_suite: Any) -> None:
    from conformance import roundtrip

    damaged = _damaged_checkpoints(pytester.path)
    models = [arg for path in damaged.values() for arg in ("--model", str(path))]
    results = _report(pytester, run_suite, *models, "--model", "gpt2", "--variant", "eager",
                      "--dtype", "fp32", "-k", "test_save_load")
    by_model = {r["model"]: r for r in results}
    for damage, path in damaged.items():
        record = by_model[path.name]
        names = roundtrip.DAMAGES[damage][1]
        assert record["outcome"] == "failed", f"{damage}: {record}"
        assert names in record["reason"] and "\n" not in record["reason"].strip(), record["reason"]
        assert "Traceback" not in record["reason"]
        DETECTIONS.append((f"damaged:{damage}", record["check"], "one-line failure",
                           record["reason"].split("damaged checkpoint: ", 1)[-1][:110]))
    healthy = by_model["gpt2"]
    assert healthy["outcome"] == "passed", f"the next model's test must still run: {healthy}"
