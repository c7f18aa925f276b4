"""The human report: Markdown and a self-contained HTML page from report.json, and the page
rendering in headless Chromium (the screenshot stays under the test's tmp dir)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conformance.reporting import render

CHROMIUM = "/usr/bin/chromium"


def _record(nodeid: str, variant: str, claims: list[str], outcome: str = "passed", reason: str = "",
            padding: str | None = "none", **metrics: Any) -> dict[str, Any]:
    return {"nodeid": f"conformance/suite/{nodeid}", "check": nodeid.split("[")[0][5:],
            "claims": claims, "model": "llama", "variant": variant, "dtype": "fp32",
            "padding": padding, "outcome": outcome, "reason": reason, "metrics": metrics,
            "duration_s": 0.1}


def _sweep(speedups: list[float], exponent: float, scale: float) -> dict[str, Any]:
    seqs = [128, 256, 512, 1024]
    return {"sweep": [{"seq": s, "speed_ratio": v, "speed_ratio_q1": v * 0.95,
                       "speed_ratio_q3": v * 1.05, "speed_noise": 0.05,
                       "variant_peak_bytes": int(scale * s ** exponent),
                       "reference_peak_bytes": int(4 * s ** 1.85)} for s, v in zip(seqs, speedups)],
            "memory_exponent": exponent, "reference_memory_exponent": 1.85, "reference": "eager",
            "verdicts": [{"budget": "min_speed_ratio", "seq": 1024, "measured": speedups[-1],
                          "limit": 1.5, "verdict": "pass"}],
            "budget_file": "fixtures/budgets/cpu.toml:30"}


def report() -> dict[str, Any]:
    results = [
        _record("test_logits[llama-eager-fp32-nopad]", "eager", ["REF"], err_over_bound=0.4,
                max_abs_err=1e-5),
        _record("test_logits[llama-sdpa-fp32-nopad]", "sdpa", ["C08"], err_over_bound=0.45),
        _record("test_logits[gpt2-sdpa-fp32-pad_left]", "sdpa", ["C08"], outcome="failed",
                reason="max|variant - golden| = 3e-05 > bound 1e-05 <script>alert('x')</script>"),
        _record("test_logits[llama-fa2-fp16-nopad]", "fa2", ["C01", "C03"], outcome="not_applicable",
                reason="not applicable: fa2 on cpu: needs a cuda device"),
        _record("test_logits[llama-bnb_nf4-fp32-nopad]", "bnb_nf4", ["C11"], err_over_bound=0.6,
                rel_l2_err=0.5, top1_agreement=0.4),
        _record("test_speed_memory_budget[cpu-llama-sdpa_flash-fp32-nopad]", "sdpa_flash", ["C05"],
                **_sweep([1.1, 2.9, 4.3, 7.8], 1.0, 900)),
        _record("test_speed_memory_budget[cpu-llama-sdpa_flash-fp32-pad_right]", "sdpa_flash",
                ["C05"], padding="right", **_sweep([1.0, 1.2, 2.6, 4.7], 1.41, 60)),
    ]
    return {"schema_version": 1, "results": results,
            "environment": {"device": "cpu", "device_name": "x86_64", "versions": {"torch": "2.13"},
                            "hypothesis": {"profile": "ci", "max_examples": 6, "derandomize": True}},
            "summary": {"outcomes": {"passed": 5, "failed": 1, "not_applicable": 1}}}


def test_markdown_has_the_matrix_figures_budgets_and_failures() -> None:
    md = render.markdown(report())
    assert "| C08 |" in md and "1 FAIL 1 pass" in md and "1 n/a" in md
    assert "| bnb_nf4 | 1 | 0.6 |" in md
    assert "min_speed_ratio | 1024 | 7.8 |  | 1.5 | pass" in md  # no interval: a report before them
    assert "test_logits[gpt2-sdpa-fp32-pad_left]" in md


def test_html_is_self_contained_with_reasons_on_hover_and_plots() -> None:
    pytest.importorskip("matplotlib")
    page = render.html_page(report())
    assert "<script>" not in page, "reasons must be escaped"
    assert ("title='C08 x sdpa: 1 failed, 1 passed\n1 x failed: max|variant - golden| = 3e-05 "
            "&gt; bound 1e-05 &lt;script&gt;") in page
    assert page.count("data:image/png;base64,") == 3  # speedup, memory, error distribution
    assert "http://" not in page and "https://" not in page  # nothing fetched from anywhere


def test_cli_writes_both_pages_and_refuses_a_missing_report(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text(json.dumps(report()))
    done = subprocess.run([sys.executable, "-m", "conformance.reporting.render", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report.html").is_file()
    missing = subprocess.run([sys.executable, "-m", "conformance.reporting.render", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "no report.json there" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_html_renders_in_headless_chromium(tmp_path: Path) -> None:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (Debian package `chromium`)")
    plt = pytest.importorskip("matplotlib.pyplot")
    (tmp_path / "report.json").write_text(json.dumps(report()))
    _, page = render.render_dir(tmp_path)
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1400,1000", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = plt.imread(str(shot))
    assert pixels.shape[:2] == (1000, 1400)
    # a rendered page, not a blank one: the matrix's coloured cells and text are there
    assert pixels[..., :3].std() > 0.05
    colours = {tuple((pixels[y, x, :3] * 255).round().astype(int)) for y in range(0, 1000, 4)
               for x in range(0, 1400, 4)}
    assert (0xbf, 0xe5, 0xbf) in colours and (0xf4, 0xb6, 0xb6) in colours  # pass and FAIL cells
