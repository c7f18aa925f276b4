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


def results_of(pytester: pytest.Pytester, run_suite: Any, name: str, *args: str) -> list[dict]:
    """Run the suite with `args`, its report in pytester's folder `name`: the report's results."""
    import json

    out = pytester.path / name
    run_suite(*args, f"--conformance-report={out}")
    return json.loads((out / "report.json").read_text())["results"]


RANK = {"passed": 0, "xfailed": 0, "skipped": 1, "not_applicable": 1, "xpassed": 2, "failed": 3,
        "error": 3}


def run_fault(pytester: pytest.Pytester, run_suite: Any, plugin: str, fault: Any,
              target: str = "conformance") -> dict[str, dict]:
    """Run the suite (or one of its modules, `target`) with the fault catalogue `plugin` on a
    fault and its healthy twin; per variant, the record with the worst outcome (a check can have
    several records, e.g. paddings)."""
    import json

    out = pytester.path / "report"
    padding = getattr(fault, "padding", "")
    run_suite(
        "-p", plugin, "--pyargs", target, "-q",
        "--model", fault.model, "--dtype", fault.dtype,
        "--variant", fault.variant.id, "--variant", fault.control,
        "-k", f"test_{fault.caught_by} and {padding}" if padding else f"test_{fault.caught_by}",
        "--conformance-report", str(out),
    )
    by_variant: dict[str, dict] = {}
    for record in json.loads((out / "report.json").read_text())["results"]:
        kept = by_variant.get(record["variant"])
        if kept is None or RANK[record["outcome"]] > RANK[kept["outcome"]]:
            by_variant[record["variant"]] = record
    return by_variant


def control_unmet(fault: Any) -> str | None:
    """Why a fault's healthy twin cannot run here, or None (asked without starting a subprocess)."""
    from conformance import zoo
    from conformance.environment import probe
    from conformance.variants import REGISTRY

    if fault.model not in {m.name for m in zoo.default_zoo()}:
        return f"model {fault.model} is not installed"
    return REGISTRY[fault.control].needs.unmet(probe("cpu"), fault.dtype)


def assert_caught(fault: Any, by_variant: dict[str, dict]) -> None:
    """The healthy twin passed and the fault failed in the check it names, with a message saying
    what differed; the row goes into the detection table. A twin that cannot run here skips."""
    __tracebackhide__ = True
    control, planted = by_variant.get(fault.control), by_variant.get(fault.variant.id)
    assert control is not None and planted is not None, f"run selected nothing: {by_variant}"
    if control["outcome"] in ("skipped", "not_applicable"):
        pytest.skip(f"control {fault.control} cannot run here: {control['reason']}")
    assert control["outcome"] == "passed", (
        f"healthy twin {fault.control} must pass the same selection: {control['reason']}")
    assert planted["outcome"] == "failed", (
        f"{fault.description}: expected check {fault.caught_by} to fail, got {planted['outcome']}")
    assert planted["check"] == fault.caught_by
    assert fault.message in planted["reason"], planted["reason"]
    DETECTIONS.append((fault.variant.id, planted["check"], "caught",
                       planted["reason"].split(": ", 1)[-1][:110]))


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
