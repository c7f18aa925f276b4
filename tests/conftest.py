"""The suite's own tests: unit tests, the plugin via pytester, and the planted-fault catalogue."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["pytester"]

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
