"""The suite's own tests: unit tests, the plugin via pytester, and the planted-fault catalogue."""

from __future__ import annotations

import os
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["pytester"]

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def run_suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run the suite in a fresh interpreter, as a user would (and as in-process runs cannot:
    pytester's sys.modules snapshot breaks transformers' lazy imports between runs)."""
    monkeypatch.setenv("PYTHONPATH", TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # when the self-tests themselves run under xdist, the suite in the subprocess is no worker
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)

    def run(*args: str) -> pytest.RunResult:
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=600)

    return run


RANK = {"passed": 0, "xfailed": 0, "skipped": 1, "not_applicable": 1, "xpassed": 2, "failed": 3,
        "error": 3}


def run_fault(pytester: pytest.Pytester, run_suite: Any, plugin: str, fault: Any) -> dict[str, dict]:
    """Run the suite with the fault catalogue `plugin` on a fault and its healthy twin; per variant,
    the record with the worst outcome (a check can have several records, e.g. paddings)."""
    import json

    out = pytester.path / "report"
    run_suite(
        "-p", plugin, "--pyargs", "conformance", "-q",
        "--model", fault.model, "--dtype", fault.dtype,
        "--variant", fault.variant.id, "--variant", fault.control,
        "-k", f"{fault.caught_by} and {fault.padding}" if fault.padding else fault.caught_by,
        "--conformance-report", str(out),
    )
    by_variant: dict[str, dict] = {}
    for record in json.loads((out / "report.json").read_text())["results"]:
        kept = by_variant.get(record["variant"])
        if kept is None or RANK[record["outcome"]] > RANK[kept["outcome"]]:
            by_variant[record["variant"]] = record
    return by_variant


class _Detections(list):
    """Rows of the detection table. Appending also records the row on the running test, so the
    table is complete under xdist too (user_properties travel with the workers' reports)."""

    item: pytest.Item | None = None

    def append(self, row: tuple[str, str, str, str]) -> None:  # type: ignore[override]
        if self.item is not None:
            self.item.user_properties.append(("detection", tuple(row)))
        super().append(row)


DETECTIONS = _Detections()  # fault, check, verdict, figure


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    DETECTIONS.item = item


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    rows = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) == "call":
                rows += [value for key, value in getattr(report, "user_properties", ())
                         if key == "detection"]
    if not rows:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"planted faults: which check caught each ({len(rows)} detections)")
    for column in ("fault", "caught by", "verdict", "figure / message"):
        table.add_column(column)
    for row in sorted(rows):
        table.add_row(*row)
    console = Console(file=terminalreporter._tw, width=200, force_terminal=False)
    console.print(table)
