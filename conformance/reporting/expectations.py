"""Vendors' and stacks' expectation files: one test id (or a fragment of one) per line,
``#`` comments, ``*`` matching any run of characters; the comment above an entry is its reason.
Entries that match no test are reported, never silently ignored (array-api-tests'
--xfails-file / --skips-file)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


class ExpectationsError(Exception):
    """A malformed or missing file: the message is one line naming file and line."""


@dataclass(frozen=True)
class Entry:
    pattern: str
    reason: str
    where: str  # file:line


def parse(path: str) -> list[Entry]:
    file = Path(path)
    if not file.is_file():
        raise ExpectationsError(f"{path}: no such expectations file")
    entries, comment = [], ""
    for number, raw in enumerate(file.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line:
            comment = ""
            continue
        if line.startswith("#"):
            comment = (comment + " " + line.lstrip("# ")).strip()
            continue
        pattern, _, inline = line.partition(" #")
        if " " in pattern.strip():
            raise ExpectationsError(f"{path}:{number}: expected one test id per line, got {line!r}")
        entries.append(Entry(pattern.strip(), inline.strip() or comment, f"{path}:{number}"))
    return entries


def matches(entry: Entry, nodeid: str) -> bool:
    """A fragment of the test id; `*` stands for any run of characters (brackets are literal)."""
    if "*" not in entry.pattern:
        return entry.pattern in nodeid
    return re.search(".*".join(re.escape(part) for part in entry.pattern.split("*")), nodeid) is not None
