"""Speed and memory budgets as data (C05, and the memory promise of C10/C11).

A budget file is TOML, one per hardware class (``fixtures/budgets/cpu.toml``, ``sm80.toml``,
``sm90.toml``); the shipped ones are the examples. A file names the classes it applies to and
lists entries of two kinds:

    hardware = ["sm80", "sm86"]      # cpu, or sm<major><minor> of a CUDA device

    [[sweep]]                        # variant vs reference over a sweep of sequence lengths
    variant = "sdpa_flash"
    dtype = "fp16"
    padding = "none"                 # none | right | left (padded rows are half as long)
    seqs = [512, 1024, 2048]
    from_seq = 1024                  # speed and memory ratios are judged at seq >= from_seq
    min_speed_ratio = 1.5            # reference time / variant time
    max_memory_ratio = 0.5           # variant peak / reference peak (memory of the forward)
    max_memory_exponent = 1.5        # slope of log(peak) vs log(seq) over the whole sweep

    [[footprint]]                    # a quantized model's bytes against its computed bound
    variant = "bnb_nf4"
    dtype = "fp16"
    max_over_bound = 1.0             # footprint / bound (see `footprint_bound`)
    max_footprint_ratio = 0.5        # footprint / reference footprint

Optional in every entry: ``model`` (a zoo name, checkpoint directory or cached hub id; default
``llama``), ``reference`` (default ``eager``), ``batch`` (sweeps, default 2), ``name`` (added to
the test id when one file has two entries for the same case). A malformed file is one line that
names the file and line.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9/3.10
    import tomli as tomllib

HARDWARE_RE = re.compile(r"^(cpu|sm\d{2,3})$")
PADDINGS = ("none", "right", "left")
DEFAULT_MODEL = "llama"
# bitsandbytes keeps per-module constants next to each quantized weight: the 16-entry fp32 code
# table of 4-bit, and with double quantization an offset, a nested absmax and the nested
# 256-entry fp32 code table (1 KiB: measured +785 bytes per module for nf4+dq over nf4 on the
# zoo's llama). The bound allows 1280 bytes per quantized module for them.
QUANT_STATE_BYTES_PER_MODULE = 1280
ABSMAX_BLOCK = 64  # bitsandbytes' default 4-bit block: one fp32 absmax per 64 weights

COMMON = {"variant": str, "dtype": str, "model": str, "reference": str, "name": str}
KEYS: dict[str, dict[str, Any]] = {
    "sweep": {**COMMON, "padding": str, "batch": int, "seqs": list, "from_seq": int,
              "min_speed_ratio": float, "max_memory_ratio": float, "max_memory_exponent": float},
    "footprint": {**COMMON, "max_over_bound": float, "max_footprint_ratio": float},
}
REQUIRED = {"sweep": ("variant", "dtype", "seqs"), "footprint": ("variant", "dtype")}
LIMITS = {"sweep": ("min_speed_ratio", "max_memory_ratio", "max_memory_exponent"),
          "footprint": ("max_over_bound", "max_footprint_ratio")}


class BudgetError(Exception):
    """A malformed budget file: the message is one line naming file and line."""


@dataclass(frozen=True)
class Budget:
    kind: str  # "sweep" | "footprint"
    hardware: tuple[str, ...]
    where: str  # file:line of the entry
    case: Any  # conformance.cases.Case: model x variant x dtype (x padding)
    reference: str
    name: str = ""
    batch: int = 2
    seqs: tuple[int, ...] = ()
    from_seq: int = 0
    limits: dict[str, float] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return "-".join(filter(None, (self.hardware[0], self.case.id, self.name)))

    def batch_spec(self, seq: int) -> Any:
        """The sweep's batch at one length: `batch` rows; padded batches have every other row
        half as long, padded on the budget's side."""
        from conformance.strategies import BatchSpec

        padding = self.case.padding or "none"
        if padding == "none":
            return BatchSpec((seq,) * self.batch, "none")
        rows = tuple(seq if i % 2 == 0 else max(1, seq // 2) for i in range(max(2, self.batch)))
        return BatchSpec(rows, padding)


def hardware_class(env: Any) -> str:
    """``cpu``, or ``sm<major><minor>`` for a CUDA device (an H100 is sm90, an A100 sm80)."""
    if env.kind != "cuda":
        return env.kind
    major, minor = env.capability or (0, 0)
    return f"sm{major}{minor}"


def shipped_files() -> list[Path]:
    from conformance.zoo import fixtures_dir

    return sorted((fixtures_dir() / "budgets").glob("*.toml"))


def load(paths: list[str | Path]) -> list[Budget]:
    """Every entry of every file, validated; ids unique across files."""
    out: list[Budget] = []
    seen: dict[str, str] = {}
    for path in paths:
        for budget in parse(Path(path)):
            if budget.id in seen:
                raise BudgetError(f"{budget.where}: budget {budget.id!r} is already defined at "
                                  f"{seen[budget.id]} (add a distinct `name`)")
            seen[budget.id] = budget.where
            out.append(budget)
    return out


def parse(path: Path) -> list[Budget]:
    if not path.is_file():
        raise BudgetError(f"{path}: no such budget file")
    text = path.read_text()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"line (\d+)", str(exc))
        line = found.group(1) if found else str(len(text.splitlines()))
        raise BudgetError(f"{path}:{line}: not valid TOML: {exc}") from None
    lines = _entry_lines(text)
    hardware = data.get("hardware")
    if isinstance(hardware, str):
        hardware = [hardware]
    if not hardware or not isinstance(hardware, list) or not all(
            isinstance(h, str) and HARDWARE_RE.match(h) for h in hardware):
        raise BudgetError(f"{path}:{lines.get(('', 0, 'hardware'), 1)}: `hardware` must be 'cpu' or "
                          f"'sm<NN>' or a list of them, got {hardware!r}")
    unknown = set(data) - {"hardware", "description", *KEYS}
    if unknown:
        key = sorted(unknown)[0]
        raise BudgetError(f"{path}:{lines.get(('', 0, key), 1)}: unknown key or table {key!r} "
                          f"(known: hardware, description, [[sweep]], [[footprint]])")
    budgets = []
    for kind in KEYS:
        entries = data.get(kind, [])
        if not isinstance(entries, list):
            raise BudgetError(f"{path}:{lines.get(('', 0, kind), 1)}: {kind} must be an array of "
                              f"tables ([[{kind}]])")
        for index, entry in enumerate(entries):
            budgets.append(_entry(path, kind, index, entry, tuple(hardware), lines))
    return budgets


def _entry(path: Path, kind: str, index: int, entry: dict[str, Any], hardware: tuple[str, ...],
           lines: dict[tuple[str, int, str], int]) -> Budget:
    header = lines.get((kind, index, ""), 1)

    def fail(key: str, message: str) -> BudgetError:
        return BudgetError(f"{path}:{lines.get((kind, index, key), header)}: [[{kind}]] {message}")

    for key, value in entry.items():
        want = KEYS[kind].get(key)
        if want is None:
            raise fail(key, f"unknown key {key!r} (known: {', '.join(KEYS[kind])})")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) if want is float \
            else isinstance(value, want) and not isinstance(value, bool)
        if not ok:
            raise fail(key, f"{key} must be a {want.__name__}, got {value!r}")
    for key in REQUIRED[kind]:
        if key not in entry:
            raise fail("", f"needs `{key}`")
    if not any(key in entry for key in LIMITS[kind]):
        raise fail("", f"states no budget (one of {', '.join(LIMITS[kind])})")
    from conformance import variants, zoo
    from conformance.cases import Case
    from conformance.compat import DTYPE_NAMES

    for key in ("variant", "reference"):
        if entry.get(key, "eager") not in variants.REGISTRY:
            raise fail(key, f"unknown variant {entry[key]!r} (known: {', '.join(variants.REGISTRY)})")
    if entry["dtype"] not in DTYPE_NAMES:
        raise fail("dtype", f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {entry['dtype']!r}")
    try:
        model = zoo.resolve(entry.get("model", DEFAULT_MODEL), _zoo())
    except zoo.ZooError as exc:
        raise fail("model", str(exc)) from None
    padding = entry.get("padding", "none") if kind == "sweep" else None
    if padding is not None and padding not in PADDINGS:
        raise fail("padding", f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
    seqs = tuple(entry.get("seqs", ()))
    if kind == "sweep":
        if len(seqs) < 2 or not all(isinstance(s, int) and s >= 2 for s in seqs) \
                or list(seqs) != sorted(set(seqs)):
            raise fail("seqs", f"seqs must be at least two increasing lengths >= 2, got {list(seqs)}")
        if entry.get("batch", 2) < 1:
            raise fail("batch", "batch must be >= 1")
    limits = {key: float(entry[key]) for key in LIMITS[kind] if key in entry}
    for key, value in limits.items():
        if value <= 0:
            raise fail(key, f"{key} must be positive, got {value}")
    return Budget(
        kind=kind,
        hardware=hardware,
        where=f"{_shown(path)}:{header}",
        case=Case(model, variants.REGISTRY[entry["variant"]], entry["dtype"], padding),
        reference=entry.get("reference", "eager"),
        name=entry.get("name", ""),
        batch=int(entry.get("batch", 2)),
        seqs=seqs,
        from_seq=int(entry.get("from_seq", seqs[-1] if seqs else 0)),
        limits=limits,
    )


@functools.cache
def _zoo() -> list[Any]:
    from conformance import zoo

    return zoo.default_zoo()


def _shown(path: Path) -> str:
    """The path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _entry_lines(text: str) -> dict[tuple[str, int, str], int]:
    """(table, index, key) -> line number: TOML parsers keep no positions, so scan the text.
    Top-level keys are ("", 0, key); an entry's header is (table, index, "")."""
    out: dict[tuple[str, int, str], int] = {}
    counts: dict[str, int] = {}
    table, index = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        header = re.match(r"^\[\[\s*([A-Za-z_]+)\s*\]\]$", line)
        if header:
            table = header.group(1)
            index = counts.get(table, 0)
            counts[table] = index + 1
            out.setdefault((table, index, ""), number)
            out.setdefault(("", 0, table), number)
            continue
        key = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=", line)
        if key:
            out.setdefault((table, index, key.group(1)), number)
    return out


def requested(config: Any) -> bool:
    """Budget checks run only when asked for: ``-m budget`` (or an expression naming it) or
    ``--budgets FILE``. Timing needs a quiet machine and minutes, so the quick run leaves them out."""
    expression = config.getoption("markexpr", "") or ""
    return bool(config.getoption("budgets", None)) or bool(re.search(r"\bbudget\b", expression))


def applicability(budget: Budget, selection: Any) -> str | None:
    """A skip reason when this budget cannot be judged here, else None."""
    from conformance.outcomes import not_applicable

    here = hardware_class(selection.env)
    if here not in budget.hardware:
        return not_applicable(
            f"budget for {'/'.join(budget.hardware)} ({budget.where}), this device is {here}")
    for vid in (budget.case.variant.id, budget.reference):
        from conformance.variants import REGISTRY

        reason = REGISTRY[vid].needs.unmet(selection.env, budget.case.dtype)
        if reason:
            if selection.env.kind not in REGISTRY[vid].needs.devices:
                return not_applicable(f"{vid}: {reason}")
            return f"{vid}: {reason}"
    return None


# ---- verdicts ----------------------------------------------------------------------------------


def judge_sweep(budget: Budget, sweep: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """(problems, figures): every limit at every judged length, with measured value and verdict.

    A speed ratio is judged by its median's confidence interval (``outcomes.judge``): pass or fail
    only when the interval lies wholly on one side of the limit; a straddling interval is
    *inconclusive*, listed in ``figures["inconclusive"]``, not in `problems`. Memory figures are
    exact (the allocator's own counts) and keep their plain comparison."""
    from conformance.measure.bench import loglog_slope
    from conformance.outcomes import FAIL, INCONCLUSIVE, PASS, judge

    limits, case = budget.limits, budget.case
    from conformance.cases import PAD_IDS

    what = f"{case.variant.id} vs {budget.reference} ({case.model.name}, {case.dtype}, " \
           f"{PAD_IDS[case.padding or 'none']})"
    verdicts: list[dict[str, Any]] = []
    problems: list[str] = []
    inconclusive: list[str] = []

    def verdict(name: str, seq: int | None, measured: float, limit: float, outcome: str | bool,
                line: str, **extra: Any) -> None:
        outcome = (PASS if outcome else FAIL) if isinstance(outcome, bool) else outcome
        verdicts.append({"budget": name, "seq": seq, "measured": measured, "limit": limit,
                         "verdict": outcome, **extra})
        if outcome == FAIL:
            problems.append(line)
        elif outcome == INCONCLUSIVE:
            inconclusive.append(line)

    for point in sweep:
        if point["seq"] < budget.from_seq:
            continue
        seq = point["seq"]
        if "min_speed_ratio" in limits:
            ratio, limit = point["speed_ratio"], limits["min_speed_ratio"]
            interval = (point.get("speed_ratio_lo", ratio), point.get("speed_ratio_hi", ratio))
            confidence = point.get("speed_confidence")
            outcome = judge(interval, limit)
            shown = f"{confidence:.0%} interval [{interval[0]:.3g}, {interval[1]:.3g}]" \
                if confidence else "no interval"
            relation = {FAIL: "<", PASS: ">=", INCONCLUSIVE: "undecided against"}[outcome]
            rounds = f", {point['rounds']} rounds" if "rounds" in point else ""
            verdict("min_speed_ratio", seq, ratio, limit, outcome,
                    f"{what} at seq {seq}: speed ratio {ratio:.3g} {relation} budget {limit:g} "
                    f"({shown}{rounds}; reference {point['reference_ms']:.3g} ms, variant "
                    f"{point['variant_ms']:.3g} ms, noise {point['speed_noise']:.1%})",
                    interval=list(interval), confidence=confidence)
        if "max_memory_ratio" in limits:
            ratio, limit = point["memory_ratio"], limits["max_memory_ratio"]
            verdict("max_memory_ratio", seq, ratio, limit, ratio <= limit,
                    f"{what} at seq {seq}: memory ratio {ratio:.3g} > budget {limit:g} "
                    f"(peak {point['variant_peak_bytes'] / 2**20:.3g} MiB vs reference "
                    f"{point['reference_peak_bytes'] / 2**20:.3g} MiB)")
    seqs = [p["seq"] for p in sweep]
    exponent = loglog_slope(seqs, [p["variant_peak_bytes"] for p in sweep])
    ref_exponent = loglog_slope(seqs, [p["reference_peak_bytes"] for p in sweep])
    if "max_memory_exponent" in limits:
        limit = limits["max_memory_exponent"]
        verdict("max_memory_exponent", None, exponent, limit, exponent <= limit,
                f"{what}: peak memory grows as seq^{exponent:.2f} over seqs {seqs} > budget "
                f"seq^{limit:g} (the reference grows as seq^{ref_exponent:.2f})")
    figures = {
        "budget_file": budget.where,
        "hardware": list(budget.hardware),
        "reference": budget.reference,
        "batch": budget.batch,
        "from_seq": budget.from_seq,
        "limits": dict(limits),
        "sweep": sweep,
        "memory_exponent": exponent,
        "reference_memory_exponent": ref_exponent,
        "speed_noise": max((p["speed_noise"] for p in sweep), default=0.0),
        "verdicts": verdicts,
        "inconclusive": inconclusive,
    }
    return problems, figures


def footprint_bound(reference_model: Any, scheme: str) -> tuple[int, dict[str, Any]]:
    """Bytes a quantized copy of `reference_model` may hold, from first principles.

    transformers quantizes every ``nn.Linear`` except the output head; the bound gives those
    weights their scheme's bits (int8: 8 bits plus one fp32 scale per output row; 4-bit: 4 bits
    plus one fp32 absmax per 64 weights; double quantization only makes that smaller) and a
    per-module allowance for bitsandbytes' constants, and everything else its loaded size.
    """
    import torch

    from conformance.measure.bench import footprint_bytes

    head = reference_model.get_output_embeddings()
    linears = [m for m in reference_model.modules()
               if isinstance(m, torch.nn.Linear) and m is not head]
    quantizable = sum(m.weight.numel() for m in linears)
    kept = footprint_bytes(reference_model) - sum(
        m.weight.numel() * m.weight.element_size() for m in linears)
    if scheme == "int8":
        quant = quantizable + 4 * sum(m.out_features for m in linears)
    else:
        quant = sum(m.weight.numel() // 2 + 4 * -(-m.weight.numel() // ABSMAX_BLOCK) for m in linears)
    bound = kept + quant + QUANT_STATE_BYTES_PER_MODULE * len(linears)
    return bound, {"quantizable_linears": len(linears), "quantizable_weights": quantizable,
                   "kept_bytes": kept, "bound_bytes": bound}


def judge_footprint(budget: Budget, footprint: int, reference: int, bound: int,
                    quantized_modules: int, detail: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    limits, case = budget.limits, budget.case
    over, ratio = footprint / bound, footprint / reference
    verdicts, problems = [], []
    what = f"{case.variant.id} on {case.model.name} ({case.dtype})"
    quantized = f"{quantized_modules} of {detail['quantizable_linears']} linear layers quantized"
    # each limit: (measured, what its failure says before "> budget ...", and after it)
    measured = {
        "max_over_bound": (over, f"{what}: footprint {footprint} bytes is {over:.3g} x its computed "
                                 f"bound {bound} bytes", f"({quantized})"),
        "max_footprint_ratio": (ratio, f"{what}: footprint ratio vs {budget.reference} {ratio:.3g}",
                                f"({footprint} vs {reference} bytes; {quantized})"),
    }
    for name, (value, head, tail) in measured.items():
        if name not in limits:
            continue
        ok = value <= limits[name]
        verdicts.append({"budget": name, "measured": value, "limit": limits[name],
                         "verdict": "pass" if ok else "fail"})
        if not ok:
            problems.append(f"{head} > budget {limits[name]:g} {tail}")
    figures = {"budget_file": budget.where, "hardware": list(budget.hardware),
               "reference": budget.reference, "limits": dict(limits), "footprint_bytes": footprint,
               "reference_footprint_bytes": reference, "footprint_over_bound": over,
               "footprint_ratio": ratio, "quantized_modules": quantized_modules, **detail,
               "verdicts": verdicts}
    return problems, figures
