"""Release gating (--baseline): the comparison rules on small reports, then end to end: a rerun
on an unchanged stack passes, and planted regressions (a 10x slower candidate, a slightly larger
error) fail the run and are named. No test here asserts on wall-clock time: the slowdown is
caught by the suite's own gating verdict on its measured speed ratio."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from faults_budget import PLANT

from conformance.reporting import gating

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent
LOGITS = "conformance/suite/test_logits.py::test_logits[llama-sdpa-fp32-nopad]"
BUDGET = "conformance/suite/test_budgets.py::test_speed_memory_budget[cpu-llama-sdpa-fp32-nopad]"


def _sweep(speed: float, noise: float = 0.05, memory: float = 0.2) -> dict[str, Any]:
    points = [{"seq": 128, "speed_ratio": speed / 3, "speed_noise": 0.5, "memory_ratio": memory},
              {"seq": 512, "speed_ratio": speed, "speed_noise": noise, "memory_ratio": memory}]
    return {"from_seq": 512, "sweep": points, "memory_exponent": 1.0}


def _report(derandomize: bool = True, versions: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "environment": {"device_name": "cpu", "versions": versions or {"torch": "2.13.0"},
                        "hypothesis": {"derandomize": derandomize, "max_examples": 6}},
        "results": [
            {"nodeid": LOGITS, "outcome": "passed", "reason": "",
             "metrics": {"err_over_bound": 0.4, "max_abs_err": 1e-5}},
            {"nodeid": BUDGET, "outcome": "passed", "reason": "", "metrics": _sweep(3.0)},
        ],
    }


def _with(report: dict[str, Any], nodeid: str, **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(report)
    record = next(r for r in out["results"] if r["nodeid"] == nodeid)
    metrics = changes.pop("metrics", {})
    record.update(changes)
    record["metrics"].update(metrics)
    return out


def _regressions(result: dict[str, Any]) -> list[tuple[str, str]]:
    return [(r["check"], r["what"]) for r in result["rows"] if r["verdict"] == "regression"]


def test_identical_reports_pass() -> None:
    result = gating.compare(_report(), _report())
    assert result["regressions"] == 0 and result["rows"] == [] and result["compared_checks"] == 2
    assert result["ok_rows"] == 7  # 2 outcomes, 2 error figures, speed + memory at 512, exponent


def test_a_check_that_passed_and_now_fails_is_a_regression() -> None:
    now = _with(_report(), LOGITS, outcome="failed", reason="max|variant - golden| = 1 > bound")
    result = gating.compare(_report(), now)
    assert _regressions(result) == [(LOGITS, "outcome")]
    assert "bound" in result["rows"][0]["note"]


def test_a_pass_that_became_a_skip_is_a_warning_not_a_regression() -> None:
    now = _with(_report(), LOGITS, outcome="skipped", reason="needs something")
    result = gating.compare(_report(), now)
    assert result["regressions"] == 0 and result["counts"]["warning"] == 1


def test_error_figures_must_reproduce_exactly_on_the_same_stack() -> None:
    now = _with(_report(), LOGITS, metrics={"err_over_bound": 0.4000001})
    assert _regressions(gating.compare(_report(), now)) == [(LOGITS, "err_over_bound")]
    smaller = _with(_report(), LOGITS, metrics={"err_over_bound": 0.3})
    assert gating.compare(_report(), smaller)["regressions"] == 0


def test_error_figures_get_the_measured_band_across_stacks() -> None:
    other = _report(versions={"torch": "2.14.0"})
    within = _with(other, LOGITS, metrics={"err_over_bound": 0.65})  # <= 0.4 x 1.5 + 0.1
    beyond = _with(other, LOGITS, metrics={"err_over_bound": 0.75})
    assert gating.compare(_report(), within)["regressions"] == 0
    assert _regressions(gating.compare(_report(), beyond)) == [(LOGITS, "err_over_bound")]


def test_error_figures_are_not_compared_between_different_draws() -> None:
    now = _with(_report(derandomize=False), LOGITS, metrics={"err_over_bound": 0.9})
    result = gating.compare(_report(derandomize=False), now)
    assert result["regressions"] == 0 and not result["figures_compared"]
    assert any("not derandomized" in n for n in result["notes"])


def test_speed_ratio_drop_beyond_the_noise_band_is_a_regression() -> None:
    slower = _with(_report(), BUDGET, metrics=_sweep(0.6))  # a 5x slowdown
    assert _regressions(gating.compare(_report(), slower)) == [(BUDGET, "speed_ratio @ seq 512")]
    swing = _with(_report(), BUDGET, metrics=_sweep(2.0))  # -33%: within the measured swing
    assert gating.compare(_report(), swing)["regressions"] == 0


def _with_interval(metrics: dict[str, Any], lo: float, hi: float) -> dict[str, Any]:
    judged = metrics["sweep"][-1]
    judged.update(speed_ratio_lo=lo, speed_ratio_hi=hi)
    return metrics


def test_a_drop_whose_interval_straddles_the_limit_is_inconclusive_not_a_regression() -> None:
    # baseline 3.0, noise 5%: the limit is 3.0 x (1 - 40%) = 1.8; the median 1.7 is below it
    straddling = _with(_report(), BUDGET, metrics=_with_interval(_sweep(1.7), 1.5, 1.9))
    result = gating.compare(_report(), straddling)
    assert result["regressions"] == 0 and result["inconclusive"] == 1
    (row,) = result["rows"]
    assert (row["what"], row["verdict"]) == ("speed_ratio @ seq 512", "inconclusive")
    assert row["note"] == "interval [1.5, 1.9]"
    below = _with(_report(), BUDGET, metrics=_with_interval(_sweep(1.7), 1.5, 1.75))
    assert _regressions(gating.compare(_report(), below)) == [(BUDGET, "speed_ratio @ seq 512")]


def test_a_pass_that_became_inconclusive_is_inconclusive_and_its_figures_still_gated() -> None:
    now = _with(_report(), BUDGET, outcome="inconclusive", reason="inconclusive: interval straddles",
                metrics=_sweep(0.6))  # and a 5x slowdown, wholly below the gating limit
    result = gating.compare(_report(), now)
    verdicts = {r["what"]: r["verdict"] for r in result["rows"]}
    assert verdicts == {"outcome": "inconclusive", "speed_ratio @ seq 512": "regression"}
    failed = _with(now, BUDGET, outcome="failed", reason="speed ratio < budget")
    assert (BUDGET, "outcome") in _regressions(gating.compare(now, failed))  # it was not a pass
    assert "1 inconclusive" in "\n".join(gating.table_lines(result))


def test_memory_ratio_rise_is_a_regression() -> None:
    hungrier = _with(_report(), BUDGET, metrics=_sweep(3.0, memory=0.3))
    assert _regressions(gating.compare(_report(), hungrier)) == [(BUDGET, "memory_ratio @ seq 512")]


def test_table_names_each_regression() -> None:
    now = _with(_report(), BUDGET, metrics=_sweep(0.6))
    lines = "\n".join(gating.table_lines(gating.compare(_report(), now)))
    assert "1 regression(s)" in lines and "REGRESSION" in lines
    assert "test_speed_memory_budget[cpu-llama-sdpa-fp32-nopad]" in lines  # brackets survive


@pytest.mark.parametrize(("content", "fragment"), [
    (None, "no report.json there"), ("{not json", "not a report.json"), ('{"a": 1}', "no 'results'")])
def test_unreadable_baseline_is_one_line(tmp_path: Path, content: str | None, fragment: str) -> None:
    if content is not None:
        (tmp_path / "report.json").write_text(content)
    with pytest.raises(gating.BaselineError) as info:
        gating.load_baseline(str(tmp_path))
    assert fragment in str(info.value) and "\n" not in str(info.value)


# ---- end to end -------------------------------------------------------------------------------

CANDIDATE_BUDGET = """
hardware = "cpu"
# A loose budget: the budget check passes even for the slowed candidate; the gate must see the
# drop against the baseline run (healthy SDPA: ~3-4x eager at seq 512 on this CPU).
[[sweep]]
variant = "candidate"
dtype = "fp32"
seqs = [128, 512]
from_seq = 512
min_speed_ratio = 0.05
"""


def _run(tmp: Path, name: str, *extra: str, plant: str = "") -> tuple[subprocess.CompletedProcess, dict]:
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", PLANT: plant}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), environ.get("PYTHONPATH")]))
    budget = tmp / "candidate.toml"
    budget.write_text(CANDIDATE_BUDGET)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:randomly",
         "-p", "faults_budget", "--pyargs", "conformance", "-q", "--hypothesis-profile", "ci",
         "--model", "llama", "--dtype", "fp32", "--variant", "candidate",
         "-k", "(test_logits or budget) and nopad", "--budgets", str(budget),
         "--conformance-report", str(tmp / name), *extra],
        capture_output=True, text=True, cwd=ROOT, env=environ, timeout=900)
    report = tmp / name / "report.json"
    assert report.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads(report.read_text())


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("gating")
    result, body = _run(tmp, "baseline")
    assert result.returncode == 0, result.stdout[-3000:]
    assert {r["outcome"] for r in body["results"]} == {"passed"} and len(body["results"]) == 2
    return tmp


def test_rerun_on_an_unchanged_stack_passes_the_gate(baseline: Path) -> None:
    result, body = _run(baseline, "rerun", "--baseline", str(baseline / "baseline"))
    assert result.returncode == 0, result.stdout[-3000:]
    gate = body["gating"]
    assert gate["regressions"] == 0 and gate["figures_compared"] and gate["same_stack"]
    # derandomized draws on one stack reproduce every error figure exactly
    assert not [r for r in gate["rows"] if r["what"] in gating.ERROR_FIGURES], gate["rows"]
    assert "release gating against" in result.stdout and "0 regression(s)" in result.stdout
    html = (baseline / "rerun" / "report.html").read_text()
    assert "Release gating" in html and "data:image/png;base64," in html


def test_planted_slowdown_and_error_increase_fail_the_gate_and_are_named(baseline: Path) -> None:
    result, body = _run(baseline, "planted", "--baseline", str(baseline / "baseline"),
                        plant="slow,error")
    assert result.returncode == 1, result.stdout[-3000:]
    named = {(r["check"].split("::")[-1], r["what"]) for r in body["gating"]["rows"]
             if r["verdict"] == "regression"}
    assert ("test_speed_memory_budget[cpu-llama-candidate-fp32-nopad]", "speed_ratio @ seq 512") in named
    assert ("test_logits[llama-candidate-fp32-nopad]", "err_over_bound") in named
    assert {r["outcome"] for r in body["results"]} == {"passed"}, "the plants stay within the checks"
    assert "REGRESSION" in result.stdout and "test_logits[llama-candidate-fp32-nopad]" in result.stdout
