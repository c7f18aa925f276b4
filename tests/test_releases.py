"""conformance.releases: the replay / sweep summaries over small synthetic report.json files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conformance import releases

FAIL = ("AssertionError: llama-sdpa-fp32: dynamic-cache decoding in chunks [1, 2] vs one full forward: "
        "max|difference| = 4.77 > bound 2.27e-05 (= 2.0 x reference rounding error 8.23e-06 + floor "
        "6.26e-06) at real token 3")


def record(outcome: str, reason: str = "", nodeid: str = "t::test_x[llama-sdpa-fp32]",
           **metrics: Any) -> dict[str, Any]:
    return {"nodeid": nodeid, "check": "x", "outcome": outcome, "reason": reason, "metrics": metrics}


def write(directory: Path, *results: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.json").write_text(json.dumps({"schema_version": 1, "results": list(results)}))
    return directory


def cases_file(tmp_path: Path, *cases: dict[str, Any]) -> Path:
    path = tmp_path / "replay.json"
    path.write_text(json.dumps({"cases": list(cases)}))
    return path


def case(name: str = "c1", **extra: Any) -> dict[str, Any]:
    return {"case": name, "buggy": "4.38.2", "fixed": "4.39.0", "model": "llama", "variant": "sdpa",
            "check": "test_cache_consistency and dynamic", **extra}


@pytest.mark.parametrize(("outcome", "reason", "suite_error"), [
    ("error", "fixture setup raised", True),
    ("failed", "AttributeError: 'StaticCache' object has no attribute 'get_max_length'", True),
    ("failed", "TypeError: __init__() got an unexpected keyword argument 'batch_size'", True),
    ("failed", "ImportError: cannot import name 'masking_utils'", True),
    ("failed", "ModuleNotFoundError: No module named 'transformers.masking_utils'", True),
    ("failed", "NameError: name 'x' is not defined", True),
    ("failed", FAIL, False),
    ("passed", "", False),
    ("not_applicable", "not applicable: needs CUDA", False),
])
def test_suite_error_classification(outcome: str, reason: str, suite_error: bool) -> None:
    assert releases.is_suite_error(record(outcome, reason)) is suite_error


def test_figure_from_message_then_metrics() -> None:
    assert releases.figure(record("failed", FAIL, max_abs_diff=8.03)) == "4.77"
    group = record("failed", "ExceptionGroup: Hypothesis found 2 distinct failures.", max_abs_diff=8.857)
    assert releases.figure(group) == "8.86"
    assert releases.figure(record("failed", "boom")) is None
    assert "worst of 50 examples: 8.03" in releases.describe(record("failed", FAIL, max_abs_diff=8.03,
                                                                    examples=50))


def test_tally_counts_and_missing(tmp_path: Path) -> None:
    write(tmp_path / "r", record("passed"), record("failed", FAIL), record("not_applicable", "n/a"),
          record("error", "x"), record("failed", "TypeError: bad"), record("skipped", "slow"),
          record("xfailed", "known"))
    t = releases.tally(tmp_path / "r")
    assert (len(t.passed), len(t.failed), len(t.not_applicable), len(t.suite_errors), len(t.skipped),
            len(t.other)) == (1, 1, 1, 2, 1, 1)
    assert t.counts().startswith("1 passed, 1 failed, 1 not applicable, 2 suite errors")
    missing = releases.tally(tmp_path / "nothing")
    assert missing.missing and "not found" in missing.counts()


def test_replay_caught(tmp_path: Path) -> None:
    write(tmp_path / "reports" / "c1" / "buggy", record("failed", FAIL, max_abs_diff=8.03, examples=50))
    write(tmp_path / "reports" / "c1" / "fixed", record("passed", max_abs_diff=4e-6))
    rows, status = releases.replay(cases_file(tmp_path, case()), tmp_path / "reports", [])
    assert status == 0
    assert rows[0].verdict == "CAUGHT" and "4.77" in rows[0].detail


@pytest.mark.parametrize(("buggy", "fixed", "verdict"), [
    (record("passed"), record("passed"), "NOT CAUGHT"),  # the check is blind to the bug
    (record("failed", FAIL), record("failed", FAIL), "NOT CAUGHT"),  # the fix did not fix it
    (record("skipped", "no static cache"), record("passed"), "NOT CAUGHT"),
    (record("failed", FAIL), record("failed", "TypeError: '<' not supported"), "SUITE ERROR"),
    (record("error", "setup"), record("passed"), "SUITE ERROR"),
])
def test_replay_not_caught(tmp_path: Path, buggy: dict[str, Any], fixed: dict[str, Any],
                           verdict: str) -> None:
    write(tmp_path / "reports" / "c1" / "buggy", buggy)
    write(tmp_path / "reports" / "c1" / "fixed", fixed)
    rows, status = releases.replay(cases_file(tmp_path, case()), tmp_path / "reports", [])
    assert status == 1
    assert rows[0].verdict == verdict


def test_replay_missing_report_and_unknown_case(tmp_path: Path) -> None:
    file = cases_file(tmp_path, case())
    rows, status = releases.replay(file, tmp_path / "reports", [])
    assert status == 1 and rows[0].verdict == "NOT CAUGHT" and "not found" in rows[0].detail
    _, status = releases.replay(file, tmp_path / "reports", ["no-such-case"])
    assert status == 1


def test_replay_known_gap_does_not_fail(tmp_path: Path) -> None:
    write(tmp_path / "reports" / "c1" / "buggy", record("passed"))
    write(tmp_path / "reports" / "c1" / "fixed", record("passed"))
    file = cases_file(tmp_path, case(not_caught="no check exercises repeated static-cache generate"))
    rows, status = releases.replay(file, tmp_path / "reports", [])
    assert status == 0 and rows[0].verdict == "KNOWN GAP"


def test_replay_selects_named_cases(tmp_path: Path) -> None:
    for name in ("c1", "c2"):
        write(tmp_path / "reports" / name / "buggy", record("failed", FAIL))
        write(tmp_path / "reports" / name / "fixed", record("passed"))
    rows, status = releases.replay(cases_file(tmp_path, case("c1"), case("c2")), tmp_path / "reports",
                                   ["c2"])
    assert status == 0 and [r.case for r in rows] == ["c2"]


def test_sweep_rows_and_status(tmp_path: Path) -> None:
    write(tmp_path / "4.48.3", record("passed"), record("failed", FAIL), record("not_applicable", "n/a"))
    rows, status = releases.sweep(tmp_path, ["4.48.3"])
    assert status == 0 and len(rows[0][1].passed) == 1
    write(tmp_path / "4.36.2", record("failed", "AttributeError: no get_seq_length"))
    _, status = releases.sweep(tmp_path, ["4.48.3", "4.36.2"])
    assert status == 1
    _, status = releases.sweep(tmp_path, ["4.48.3", "5.0.0"])  # no report for 5.0.0
    assert status == 1


def test_main_prints_one_row_per_case(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "reports" / "c1" / "buggy", record("failed", FAIL))
    write(tmp_path / "reports" / "c1" / "fixed", record("passed"))
    file = cases_file(tmp_path, case())
    assert releases.main(["replay", str(file), str(tmp_path / "reports")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("c1 | 4.38.2 -> 4.39.0") and "CAUGHT" in lines[1]
    write(tmp_path / "sweep" / "4.48.3", record("passed"))
    assert releases.main(["sweep", str(tmp_path / "sweep"), "4.48.3"]) == 0
    assert "4.48.3 | 1 | 0 | 0 | 0 | 0" in capsys.readouterr().out
    assert releases.main(["bogus"]) == 2


def test_float64_causal_mask_guard() -> None:
    torch = pytest.importorskip("torch")
    utils = pytest.importorskip("transformers.modeling_attn_mask_utils")
    converter = getattr(utils, "AttentionMaskConverter", None)
    if converter is None or "_make_causal_mask" not in converter.__dict__:
        pytest.skip("this transformers has no AttentionMaskConverter._make_causal_mask")
    releases.float64_causal_mask()
    assert releases.float64_causal_mask() is False  # installed once
    before = torch.get_default_dtype()
    mask = converter._make_causal_mask((1, 3), torch.float64, torch.device("cpu"))
    assert torch.get_default_dtype() == before
    assert mask.dtype == torch.float64 and mask[0, 0, 0, 1] == torch.finfo(torch.float64).min
    assert mask[0, 0, 2, 0] == 0
