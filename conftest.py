"""Repo-level conftest: run offline, and load the plugin when the package is not pip-installed."""

from __future__ import annotations

import importlib.metadata
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

_installed = any(
    ep.value == "conformance.plugin" for ep in importlib.metadata.entry_points(group="pytest11")
)
if not _installed:
    pytest_plugins = ["conformance.plugin"]
