"""The plugin itself, driven through pytester: options and their errors, ids, skips, report.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import results_of

SUITE = ("--pyargs", "conformance")


def _one_line_error(result: pytest.RunResult, fragment: str) -> None:
    """Exit code 4 (usage error), the message on one line, and no traceback."""
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    err = result.stderr.str()
    assert fragment in err, err
    assert "Traceback" not in err and "Traceback" not in result.stdout.str()
    assert len([line for line in err.splitlines() if line.startswith("ERROR:")]) == 1


def test_missing_model_path_is_one_line(run_suite: Any) -> None:
    result = run_suite(*SUITE, "--model", "./does/not/exist")
    _one_line_error(result, "--model ./does/not/exist: no such directory")


def test_unknown_architecture_is_one_line(run_suite: Any, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "pegasus"}))
    result = run_suite(*SUITE, "--model", str(tmp_path))
    _one_line_error(result, "architecture 'pegasus' is not one the suite knows how to run "
                    "(kind: encoder-decoder; kinds supported: decoder (")


def test_vision_only_model_names_its_kind(run_suite: Any, tmp_path: Path) -> None:
    """An architecture the suite has never heard of is named by its config's telltales."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "pixelmodel", "image_size": 224,
                                                       "num_channels": 3}))
    result = run_suite(*SUITE, "--model", str(tmp_path))
    _one_line_error(result, "architecture 'pixelmodel' is not one the suite knows how to run "
                    "(kind: vision; kinds supported: decoder (")


def test_unknown_hub_id_is_one_line(run_suite: Any) -> None:
    result = run_suite(*SUITE, "--model", "nobody/nothing-here")
    _one_line_error(result, "not in the local Hugging Face cache")


def test_unknown_variant_pattern_is_one_line(run_suite: Any) -> None:
    result = run_suite(*SUITE, "--variant", "flashy*")
    _one_line_error(result, "--variant 'flashy*' matches no variant")


def test_bad_device_is_one_line(run_suite: Any) -> None:
    result = run_suite(*SUITE, "--device", "tpu")
    _one_line_error(result, "expected cpu, cuda or cuda:N")


def test_ids_are_human_and_complete(run_suite: Any) -> None:
    result = run_suite(*SUITE, "--collect-only", "-q", "--model", "llama",
                                "--variant", "sdpa_flash", "--dtype", "bf16")
    ids = [line for line in result.stdout.lines if "test_logits[" in line]
    assert [i.split("[")[1] for i in ids] == [
        "llama-sdpa_flash-bf16-nopad]", "llama-sdpa_flash-bf16-pad_right]",
        "llama-sdpa_flash-bf16-pad_left]",
    ]


def test_every_skip_names_what_is_missing_and_where(run_suite: Any) -> None:
    result = run_suite(*SUITE, "-rs", "--model", "gpt2", "--dtype", "fp32",
                                "--variant", "fa2", "--variant", "sdpa_efficient",
                                "-k", "test_logits and nopad",
                                "--device", "cpu")
    result.assert_outcomes(skipped=2)
    text = result.stdout.str()
    assert "needs flash-attn>=2.1" in text or "needs a cuda device" in text
    assert "run on a CUDA GPU runner" in text


@pytest.fixture(scope="session")
def user_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's own checkpoint. Session-scoped so transformers is imported outside pytester's
    sys.modules snapshot (re-importing torch libraries after a restore fails)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path_factory.mktemp("user") / "mine"
    config = GPT2Config(n_embd=32, n_head=2, n_layer=2, n_positions=64, vocab_size=64)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def test_user_checkpoint_replaces_zoo_and_writes_report(run_suite: Any, user_checkpoint: Path,
                                                         tmp_path: Path) -> None:
    report = tmp_path / "report"
    result = run_suite(*SUITE, "--model", str(user_checkpoint), "--variant", "sdpa",
                                "--dtype", "fp32", "-k", "test_logits",
                                "--conformance-report", str(report))
    result.assert_outcomes(passed=3)
    body = json.loads((report / "report.json").read_text())
    assert set(body) >= {"environment", "results", "summary"}
    assert body["environment"]["versions"]["transformers"]
    for record in body["results"]:
        assert set(record) >= {"nodeid", "claims", "model", "variant", "dtype", "check",
                               "outcome", "reason", "metrics", "duration_s"}
        assert record["model"] == "mine" and record["claims"] == ["C08"]
        assert record["outcome"] == "passed"
        assert record["metrics"]["max_abs_err"] <= record["metrics"]["bound"]
        assert record["metrics"]["proof_ops"], "the proof figures must be reported"
        assert record["metrics"]["golden"] == ["eager fp64 on cpu"]  # a tiny model: float64 fits
    assert body["summary"]["by_claim"]["C08"] == {"passed": 3}
    assert body["summary"]["golden"] == {"eager fp64 on cpu": 3}


def test_golden_on_the_device_is_named_and_bounds_by_the_envelope(run_suite: Any, user_checkpoint: Path,
                                                                   tmp_path: Path) -> None:
    """A checkpoint too big for a float64 golden run (forced here: --golden device) is judged
    against eager float32, every record says so and why, and the float32 rows' noise unit is the
    reference's envelope (two float32 eager runs agree to the bit: no measured noise to use)."""
    report = tmp_path / "report"
    result = run_suite(*SUITE, "--model", str(user_checkpoint), "--variant", "sdpa",
                       "--dtype", "fp32", "-k", "test_logits", "--golden", "device",
                       "--conformance-report", str(report))
    result.assert_outcomes(passed=3)
    body = json.loads((report / "report.json").read_text())
    (which,) = body["summary"]["golden"]  # a golden other than float64 says why it was chosen
    assert which.startswith("eager fp32 on cpu (") and which.endswith(": --golden device)"), which
    assert body["summary"]["golden"][which] == 3
    for record in body["results"]:
        figures = record["metrics"]
        assert figures["golden"] == [which]
        if record["variant"] == "sdpa":
            assert figures["ref_err_used"] == pytest.approx(figures["ref_envelope"]), figures


def test_header_prints_what_reproduces_the_run(run_suite: Any) -> None:
    result = run_suite(*SUITE, "--collect-only", "--device", "cpu",
                                "--model", "bert", "--variant", "eager")
    header = result.stdout.str()
    for fragment in ("torch ", "transformers ", "hypothesis ", "conformance device: cpu",
                     "profile="):
        assert fragment in header


def test_claim_markers_select_checks(run_suite: Any) -> None:
    result = run_suite(*SUITE, "--collect-only", "-q", "-m", "C06", "--model", "bert",
                                "--dtype", "fp32")
    ids = [line for line in result.stdout.lines if "test_logits[" in line]
    assert ids and all("bettertransformer" in i for i in ids)


def test_expectation_files_skip_hypothesis_xfails_and_report_unmatched(run_suite: Any,
                                                                       tmp_path: Path) -> None:
    xfails = tmp_path / "xfails.txt"
    xfails.write_text("# a vendor's known bug\ntest_logits[bert-sdpa-fp32-nopad\n"
                      "test_determinism[*-sdpa-fp32\nno_such_test[anything]  # stale entry\n")
    result = run_suite(*SUITE, "-rs", "--model", "bert", "--variant", "sdpa", "--dtype", "fp32",
                       "-k", "test_logits or test_determinism", "--xfails-file", str(xfails))
    out = result.stdout.str()
    # Hypothesis-driven checks expected to fail are skipped (xfail + shrinking is slow and flaky)
    assert "expected failure, " in out and "a vendor's known bug" in out
    result.assert_outcomes(passed=2, skipped=2)
    assert "no_such_test[anything]' matched no test" in out


def test_malformed_expectations_file_is_one_line(run_suite: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("test_logits[bert two ids on one line\n")
    result = run_suite(*SUITE, "--xfails-file", str(bad))
    _one_line_error(result, "bad.txt:1: expected one test id per line")


def _collected(*args: str) -> tuple[int, str]:
    """(items collected, rootdir line) for a collect-only run from the project root."""
    import os
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *args], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)
    found = re.search(r"collected (\d+) items", done.stdout)
    assert found, done.stdout[-2000:] + done.stderr[-2000:]
    rootdir = next(line for line in done.stdout.splitlines() if line.startswith("rootdir:"))
    return int(found.group(1)), rootdir


@pytest.mark.parametrize("suite", [(), SUITE], ids=["testpaths", "pyargs"])
def test_absolute_report_dir_keeps_rootdir_and_collection(tmp_path: Path, suite: tuple[str, ...]) -> None:
    """`--conformance-report /abs/dir` as a separate argument collects exactly what the relative
    `--conformance-report=reports/x` does, from the same rootdir: no self-test (and so no planted
    fault) ever enters the suite's run."""
    relative = _collected(*suite, "--conformance-report=reports/x")
    absolute = _collected(*suite, "--conformance-report", str(tmp_path))
    assert absolute == relative
    assert str(tmp_path) not in absolute[1]


def test_importing_fault_catalogues_leaves_the_registry_alone() -> None:
    """Planted faults enter the registry only through their plugin (-p faults), never by import."""
    import importlib

    from conformance.variants import REGISTRY

    before = set(REGISTRY)
    for name in ("faults", "faults_quant", "faults_roundtrip", "faults_budget", "faults_offload"):
        importlib.import_module(name)
    assert set(REGISTRY) == before


def test_plugin_is_quiet_in_another_project(pytester: pytest.Pytester,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With the package installed, another project's plain `pytest` keeps its own Hypothesis
    profile and environment, imports no torch, and sees no header or report from us."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("CI", raising=False)
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeconftest(
        "from hypothesis import settings\n"
        "settings.register_profile('mine', max_examples=3)\n"
        "settings.load_profile('mine')\n")
    pytester.makepyfile(test_theirs=(
        "import os, sys\n"
        "from hypothesis import settings\n"
        "def test_untouched():\n"
        "    assert settings.default.max_examples == 3\n"
        "    assert 'HF_HUB_OFFLINE' not in os.environ\n"
        "    assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    ours = [line for line in result.stdout.lines if line.startswith("conformance")]
    assert not ours, ours  # pytest's own "plugins:" line names the package; we print nothing


def test_user_model_without_weights_is_one_line_at_the_start(run_suite: Any, tmp_path: Path) -> None:
    """A --model directory with a config.json but no weights stops the run once, at the start
    (measured before: 75 failures in -k test_logits alone, each with a chained traceback)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = run_suite(*SUITE, "--model", str(tmp_path), "-k", "test_logits")
    _one_line_error(result, "has a config.json but no weights")


@pytest.mark.parametrize(("refuse", "check", "outcome"), [
    ("long", "test_logits and nopad", "passed"),  # the short examples are still judged
    ("masked", "test_logits and pad_right", "skipped"),  # every padded example is refused
])
def test_refused_examples_are_set_aside_not_the_check(pytester: pytest.Pytester, run_suite: Any,
                                                      monkeypatch: pytest.MonkeyPatch, refuse: str,
                                                      check: str, outcome: str) -> None:
    """A path that refuses some inputs (a forced kernel and a mask) is judged on the others; one
    that refuses every example skips with the reason, after checks.REFUSAL_LIMIT of them."""
    from conformance.checks import REFUSAL_LIMIT

    monkeypatch.setenv("CONFORMANCE_TEST_REFUSE", refuse)
    (record,) = results_of(pytester, run_suite, "report", "-p", "refusing", "--pyargs", "conformance",
                           "-q", "--model", "llama", "--dtype", "fp32", "--variant", "sdpa", "-k", check)
    assert record["outcome"] == outcome, record["reason"]
    assert "planted refusal" in record["metrics"]["first_refusal"]
    if outcome == "passed":
        assert record["metrics"]["refused_examples"] > 0
    else:
        assert record["metrics"]["refused_examples"] == REFUSAL_LIMIT
        assert record["reason"].startswith(f"the first {REFUSAL_LIMIT} examples were all refused")
