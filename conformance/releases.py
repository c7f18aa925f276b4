"""Release work summaries: the replay of real regressions and the release sweep (noxfile.py).

    python -m conformance.releases replay fixtures/replay.json reports/replay [CASE ...]
    python -m conformance.releases sweep reports/sweep RELEASE [RELEASE ...]
    python -m conformance.releases materialize fixtures/replay/falcon-alibi.json OUTDIR

Each reads the report.json files the sessions wrote and prints one row per case / release:
passed, failed, not applicable and suite errors. A suite error is an ``error`` outcome, or a
failure whose reason shows an exception from our own code or an API the release lacks
(AttributeError, TypeError, ImportError, NameError): the suite broke, the model did not.
A replay case is CAUGHT when its buggy release failed the named check and its fixed release
passed it. The exit status is 1 when a replay case is not caught (except one the case file
records as a known gap, ``not_caught``) or when any suite error appears.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUITE_EXCEPTIONS = re.compile(r"\b(AttributeError|TypeError|ImportError|ModuleNotFoundError|NameError)\b")
# the first measured figure of a failure message: "max|difference| = 0.174 > bound ..."
FIGURE = re.compile(r"=\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|inf|nan)\s*>")
PASSING = ("passed", "xpassed")
NOT_APPLICABLE = ("not_applicable",)


def is_suite_error(record: dict[str, Any]) -> bool:
    outcome = record.get("outcome")
    if outcome == "error":
        return True
    return outcome == "failed" and bool(SUITE_EXCEPTIONS.search(record.get("reason") or ""))


def figure(record: dict[str, Any]) -> str | None:
    """The failure message's figure (max|difference| and the like), as the message prints it;
    the recorded worst figure where the message has none (Hypothesis' multi-failure group)."""
    found = FIGURE.search(record.get("reason") or "")
    if found:
        return found.group(1)
    return worst_figure(record)


def worst_figure(record: dict[str, Any]) -> str | None:
    """The largest max|difference| over the check's examples (metrics), not the shrunk one."""
    value = (record.get("metrics") or {}).get("max_abs_diff")
    return None if value is None else f"{float(value):.3g}"


def cause(record: dict[str, Any]) -> str:
    """A failure without a figure (a hung rank, a refusal): its message after the case id."""
    reason = (record.get("reason") or "").strip().splitlines()
    if not reason:
        return "?"
    return reason[0].split(": ", 1)[-1][:200]


def describe(record: dict[str, Any]) -> str:
    text = f"{record.get('nodeid')}: {figure(record) or cause(record)}"
    metrics = record.get("metrics") or {}
    worst = worst_figure(record)
    if worst is not None and "examples" in metrics:
        text += f" (worst of {metrics['examples']} examples: {worst})"
    return text


@dataclass
class Tally:
    """One report directory's outcomes."""

    where: str
    missing: str | None = None  # why there is no report to read
    passed: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)  # model failures, not suite errors
    not_applicable: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    suite_errors: list[dict[str, Any]] = field(default_factory=list)
    other: list[dict[str, Any]] = field(default_factory=list)  # xfailed and the like

    @property
    def total(self) -> int:
        return sum(len(getattr(self, name)) for name in
                   ("passed", "failed", "not_applicable", "skipped", "suite_errors", "other"))

    def counts(self) -> str:
        if self.missing:
            return f"no report ({self.missing})"
        text = (f"{len(self.passed)} passed, {len(self.failed)} failed, "
                f"{len(self.not_applicable)} not applicable, {len(self.suite_errors)} suite errors")
        if self.skipped:
            text += f", {len(self.skipped)} skipped"
        if self.other:
            text += f", {len(self.other)} other"
        return text

    def worst_failure(self) -> tuple[dict[str, Any] | None, str | None]:
        """The failure with the largest figure (the first when none parses)."""
        best, best_value, best_text = None, float("-inf"), None
        for record in self.failed:
            text = figure(record)
            try:
                value = float(text) if text is not None else float("-inf")
            except ValueError:
                value = float("-inf")
            if best is None or value > best_value:
                best, best_value, best_text = record, value, text
        return best, best_text


def tally(directory: str | Path) -> Tally:
    directory = Path(directory)
    out = Tally(str(directory))
    path = directory / "report.json"
    if not path.is_file():
        out.missing = f"{path} not found"
        return out
    try:
        body = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        out.missing = f"{path} unreadable: {exc}"
        return out
    for record in body.get("results", []):
        outcome = record.get("outcome")
        if is_suite_error(record):
            out.suite_errors.append(record)
        elif outcome in PASSING:
            out.passed.append(record)
        elif outcome == "failed":
            out.failed.append(record)
        elif outcome in NOT_APPLICABLE:
            out.not_applicable.append(record)
        elif outcome == "skipped":
            out.skipped.append(record)
        else:
            out.other.append(record)
    return out


def _short(text: str, width: int = 160) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 3] + "..."


@dataclass
class ReplayRow:
    case: str
    verdict: str  # "CAUGHT" | "NOT CAUGHT" | "KNOWN GAP" | "SUITE ERROR"
    buggy: Tally
    fixed: Tally
    detail: str
    ok: bool


def replay_row(case: dict[str, Any], root: str | Path) -> ReplayRow:
    root = Path(root)
    buggy = tally(root / case["case"] / "buggy")
    fixed = tally(root / case["case"] / "fixed")
    errors = buggy.suite_errors + fixed.suite_errors
    gap = case.get("not_caught")
    if buggy.missing or fixed.missing:
        return ReplayRow(case["case"], "NOT CAUGHT", buggy, fixed,
                         buggy.missing or fixed.missing or "", ok=bool(gap))
    record, _ = buggy.worst_failure()
    if errors:
        first = errors[0]
        role = "buggy" if first in buggy.suite_errors else "fixed"
        detail = f"{role} {case[role]}: {first.get('nodeid')}: {_short(first.get('reason', ''))}"
        if record is not None:
            detail = f"buggy failed {describe(record)}; {detail}"
        return ReplayRow(case["case"], "SUITE ERROR", buggy, fixed, detail, ok=False)
    buggy_failed = record is not None
    fixed_passed = bool(fixed.passed) and not fixed.failed
    if buggy_failed and fixed_passed:
        detail = describe(record)
        if gap:
            detail += " (the case file records a gap: update it)"
        return ReplayRow(case["case"], "CAUGHT", buggy, fixed, detail, ok=True)
    why = []
    if not buggy_failed:
        why.append(f"buggy {case['buggy']} did not fail {case['check']!r}"
                   + ("" if buggy.total else " (nothing ran)"))
    if not fixed_passed:
        if fixed.failed:
            worst, _ = fixed.worst_failure()
            why.append(f"fixed {case['fixed']} failed {describe(worst)}")
        else:
            why.append(f"fixed {case['fixed']} passed nothing")
    if gap:
        return ReplayRow(case["case"], "KNOWN GAP", buggy, fixed, f"{gap}; {'; '.join(why)}", ok=True)
    return ReplayRow(case["case"], "NOT CAUGHT", buggy, fixed, "; ".join(why), ok=False)


def replay(case_file: str | Path, root: str | Path, names: list[str]) -> tuple[list[ReplayRow], int]:
    cases = json.loads(Path(case_file).read_text())["cases"]
    unknown = [n for n in names if n not in {c["case"] for c in cases}]
    chosen = [c for c in cases if not names or c["case"] in names]
    rows = [replay_row(c, root) for c in chosen]
    status = 0 if rows and not unknown and all(r.ok for r in rows) else 1
    return rows, status


def sweep(root: str | Path, releases: list[str]) -> tuple[list[tuple[str, Tally]], int]:
    rows = [(release, tally(Path(root) / release)) for release in releases]
    bad = any(t.missing or t.suite_errors for _, t in rows)
    return rows, 1 if bad or not rows else 0


def _print_replay(cases: dict[str, dict[str, Any]], rows: list[ReplayRow]) -> None:
    print("case | buggy -> fixed | check | verdict | buggy outcomes | fixed outcomes | detail")
    for row in rows:
        case = cases[row.case]
        print(f"{row.case} | {case['buggy']} -> {case['fixed']} | {case['check']} | {row.verdict} | "
              f"{row.buggy.counts()} | {row.fixed.counts()} | {row.detail}")


def _print_sweep(rows: list[tuple[str, Tally]]) -> None:
    print("transformers | passed | failed | not applicable | skipped | suite errors")
    for release, t in rows:
        if t.missing:
            print(f"{release} | no report ({t.missing})")
            continue
        print(f"{release} | {len(t.passed)} | {len(t.failed)} | {len(t.not_applicable)} | "
              f"{len(t.skipped)} | {len(t.suite_errors)}")
    for release, t in rows:
        for record in t.suite_errors:
            print(f"  suite error on {release}: {record.get('nodeid')}: {_short(record.get('reason', ''))}")
        for record in t.failed:
            print(f"  failed on {release}: {describe(record)}")


def materialize(config: str | Path, outdir: str | Path) -> str:
    """Build a replay-only config (fixtures/replay/*.json, zoo format) into a checkpoint
    directory with the installed transformers, seeded as the zoo's models are."""
    from conformance import zoo

    config = Path(config)
    meta = json.loads(config.read_text())["_zoo"]
    model = zoo.ZooModel(config.stem, meta["kind"], "config", str(config), meta.get("why", ""))
    return zoo.materialize(model, Path(outdir))


# --- pytest plugin for the replay runs (`-p conformance.releases`) ------------------------------

def pytest_configure(config: object) -> None:
    float64_causal_mask()


def float64_causal_mask() -> bool:
    """Let transformers 4.x build a float64 causal mask (the golden run's dtype).

    ``AttentionMaskConverter._make_causal_mask`` fills ``torch.full(..., finfo(dtype).min)``
    without a dtype, so under torch's float32 default a float64 mask overflows (RuntimeError:
    value cannot be converted to type float without overflow). Falcon with ALiBi builds that
    mask even for an all-ones mask, so its float64 golden run cannot start. Building it under a
    float64 default gives the mask the function means to build; float32 / half masks are
    untouched. Returns whether the guard was installed."""
    try:
        import torch
        from transformers.modeling_attn_mask_utils import AttentionMaskConverter
    except ImportError:
        return False
    original = AttentionMaskConverter.__dict__.get("_make_causal_mask")
    if original is None:
        return False
    inner = original.__func__ if isinstance(original, staticmethod) else original
    if getattr(inner, "_conformance_guard", False):
        return False

    def guarded(input_ids_shape: Any, dtype: Any, device: Any, *args: Any, **kwargs: Any) -> Any:
        if dtype != torch.float64 or torch.get_default_dtype() == torch.float64:
            return inner(input_ids_shape, dtype, device, *args, **kwargs)
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            return inner(input_ids_shape, dtype, device, *args, **kwargs)
        finally:
            torch.set_default_dtype(before)

    guarded._conformance_guard = True  # type: ignore[attr-defined]
    AttentionMaskConverter._make_causal_mask = staticmethod(guarded)
    return True


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = __doc__.split("\n\n")[1]
    if not args:
        print(usage, file=sys.stderr)
        return 2
    command, rest = args[0], args[1:]
    if command == "replay" and len(rest) >= 2:
        case_file, root, names = rest[0], rest[1], rest[2:]
        cases = {c["case"]: c for c in json.loads(Path(case_file).read_text())["cases"]}
        rows, status = replay(case_file, root, names)
        for name in names:
            if name not in cases:
                print(f"unknown replay case {name!r} (known: {', '.join(cases)})")
        _print_replay(cases, rows)
        return status
    if command == "sweep" and len(rest) >= 2:
        rows, status = sweep(rest[0], rest[1:])
        _print_sweep(rows)
        return status
    if command == "materialize" and len(rest) == 2:
        print(materialize(rest[0], rest[1]))
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
