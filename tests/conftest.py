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

    def run(*args: str) -> pytest.RunResult:
        return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=600)

    return run


DETECTIONS: list[tuple[str, str, str, str]] = []  # fault, check, verdict, figure


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not DETECTIONS:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="planted faults: which check caught each")
    for column in ("fault", "caught by", "verdict", "figure / message"):
        table.add_column(column)
    for row in DETECTIONS:
        table.add_row(*row)
    console = Console(file=terminalreporter._tw, width=200, force_terminal=False)
    console.print(table)
