"""The human report: report.json rendered as a Markdown summary and a self-contained HTML page.

    python -m conformance.reporting.render reports/current        # writes report.md and report.html there

The plugin renders both automatically next to report.json (``--conformance-report DIR``). The
page holds the claims x variants matrix (hover a cell for the reasons of its skips and
failures), each variant's error figures, the budget verdicts, and matplotlib plots embedded as
PNG: speedup and peak memory against sequence length, with and without padding (the guides'
figures, from the budget sweeps of this run), and the distribution of errors per variant.
Nothing is fetched from anywhere: styles and images are inline.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

# inconclusive (a budget whose confidence interval straddles its limit): neither pass nor fail,
# so it ranks between the two and has its own colour
OUTCOME_ORDER = ("failed", "error", "xpassed", "xfailed", "inconclusive", "passed", "skipped",
                 "not_applicable")
SYMBOL = {"passed": "pass", "failed": "FAIL", "error": "ERROR", "skipped": "skip",
          "not_applicable": "n/a", "xfailed": "xfail", "xpassed": "XPASS", "inconclusive": "?"}
COLOUR = {"failed": "#f4b6b6", "error": "#f4b6b6", "xpassed": "#f4b6b6", "xfailed": "#f6d7a7",
          "inconclusive": "#f3ec9e", "passed": "#bfe5bf", "skipped": "#e4e4e4",
          "not_applicable": "#f4f4f4"}
ERROR_FIGURES = ("err_over_bound", "max_abs_err", "rel_l2_err", "top1_agreement")


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    return json.loads(file.read_text())


def render_dir(path: str | Path) -> list[Path]:
    """Write report.md and report.html next to report.json; returns their paths."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    body = load(path)
    md, page = directory / "report.md", directory / "report.html"
    md.write_text(markdown(body))
    page.write_text(html_page(body))
    return [md, page]


# ---- shared tables ----------------------------------------------------------------------------


def _variants(results: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in results:
        if r.get("variant"):
            seen.setdefault(r["variant"], None)
    return list(seen)


def matrix(results: list[dict[str, Any]]) -> tuple[list[str], list[str], dict[tuple[str, str], list]]:
    """claims, variants, and (claim, variant) -> the results that verify it."""
    cells: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        for claim in r.get("claims") or ["-"]:
            cells[(claim, r.get("variant") or "-")].append(r)
    claims = sorted({c for c, _ in cells}, key=lambda c: (c == "-", c == "REF", c))
    variants = [v for v in _variants(results) if any((c, v) in cells for c in claims)]
    if any(v == "-" for _, v in cells):
        variants.append("-")
    return claims, variants, cells


def _counts(rs: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for r in rs:
        counts[r["outcome"]] += 1
    return dict(sorted(counts.items(), key=lambda kv: OUTCOME_ORDER.index(kv[0])
                       if kv[0] in OUTCOME_ORDER else 99))


def _worst(rs: list[dict[str, Any]]) -> str:
    outcomes = {r["outcome"] for r in rs}
    return next((o for o in OUTCOME_ORDER if o in outcomes), "skipped")


def _reasons(rs: list[dict[str, Any]], limit: int = 8) -> list[str]:
    """Distinct reasons of non-passing results, most frequent first, each with its count."""
    freq: dict[str, int] = defaultdict(int)
    for r in rs:
        if r["outcome"] != "passed" and r.get("reason"):
            freq[f"{r['outcome']}: {r['reason'].splitlines()[0][:240]}"] += 1
    ordered = sorted(freq.items(), key=lambda kv: -kv[1])
    out = [f"{n} x {text}" for text, n in ordered[:limit]]
    if len(ordered) > limit:
        out.append(f"... and {len(ordered) - limit} more distinct reasons")
    return out


def variant_figures(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: how many results carry error figures, and their worst / median values."""
    by_variant: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        if r.get("variant") and any(isinstance(r["metrics"].get(f), (int, float))
                                    for f in ERROR_FIGURES):
            by_variant[r["variant"]].append(r)
    rows = []
    for variant in _variants(results):
        rs = by_variant.get(variant)
        if not rs:
            continue
        row: dict[str, Any] = {"variant": variant, "results": len(rs)}
        ratios = [r["metrics"]["err_over_bound"] for r in rs
                  if isinstance(r["metrics"].get("err_over_bound"), (int, float))]
        if ratios:
            worst = max(rs, key=lambda r: r["metrics"].get("err_over_bound", -1))
            row.update(max_err_over_bound=max(ratios), median_err_over_bound=statistics.median(ratios),
                       worst=worst["nodeid"].split("::")[-1])
        for name, pick in (("max_abs_err", max), ("rel_l2_err", max), ("top1_agreement", min)):
            values = [r["metrics"][name] for r in rs if isinstance(r["metrics"].get(name), (int, float))]
            if values:
                row[name] = pick(values)
        rows.append(row)
    return rows


def budget_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        for v in r["metrics"].get("verdicts", []):
            interval = v.get("interval")
            rows.append({"check": r["nodeid"].split("::")[-1], "budget": v["budget"],
                         "seq": v.get("seq"), "measured": v["measured"], "limit": v["limit"],
                         "interval": f"[{interval[0]:.3g}, {interval[1]:.3g}]" if interval else "",
                         "verdict": v["verdict"], "file": r["metrics"].get("budget_file", "")})
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def _header(body: dict[str, Any]) -> list[tuple[str, str]]:
    env = body.get("environment") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
    hyp = env.get("hypothesis") or {}
    outcomes = (body.get("summary") or {}).get("outcomes") or _counts(body.get("results", []))
    return [
        ("device", f"{env.get('device', '?')} ({env.get('device_name', '?')}), compute capability "
                   f"{env.get('compute_capability') or '-'}, driver {env.get('driver') or '-'}"),
        ("stack", str(env.get("stack") or "-")),
        ("versions", versions or "-"),
        ("hypothesis", f"profile {hyp.get('profile')}, {hyp.get('max_examples')} examples, "
                       f"derandomized {hyp.get('derandomize')}, seed {hyp.get('seed')}"),
        ("outcomes", ", ".join(f"{n} {o}" for o, n in outcomes.items())),
    ]


# ---- Markdown ---------------------------------------------------------------------------------


def markdown(body: dict[str, Any]) -> str:
    results = body.get("results", [])
    lines = ["# Conformance report", ""]
    lines += [f"- **{k}**: {v}" for k, v in _header(body)]
    lines += ["", "The HTML page (report.html) has the same tables, the reasons on hover, and the plots.",
              ""]
    gating = body.get("gating")
    if gating:
        lines += ["## Release gating", "",
                  f"Against `{gating.get('baseline')}`: **{gating['regressions']} regression(s)**, "
                  f"{gating.get('inconclusive', 0)} inconclusive, "
                  f"{gating['compared_checks']} checks compared.", ""]
        lines += [f"- {n}" for n in gating.get("notes", [])]
        if gating["rows"]:
            lines += ["", "| check | what | baseline | current | band | verdict |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| `{r['check'].split('::')[-1]}` | {r['what']} | {_fmt(r['baseline'])} | "
                      f"{_fmt(r['current'])} | {r['band']} | {r['verdict']} |" for r in gating["rows"]]
        lines.append("")
    claims, variants, cells = matrix(results)
    lines += ["## Claims x variants", "",
              "| claim | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for claim in claims:
        row = []
        for variant in variants:
            rs = cells.get((claim, variant))
            row.append(" ".join(f"{n} {SYMBOL.get(o, o)}" for o, n in _counts(rs).items()) if rs else "")
        lines.append(f"| {claim} | " + " | ".join(row) + " |")
    figures = variant_figures(results)
    if figures:
        lines += ["", "## Error figures per variant", "",
                  "| variant | results | max err/bound | median err/bound | max abs err | max rel L2 | "
                  "min top-1 agreement | worst |", "|---|---|---|---|---|---|---|---|"]
        for f in figures:
            lines.append(f"| {f['variant']} | {f['results']} | {_fmt(f.get('max_err_over_bound'))} | "
                         f"{_fmt(f.get('median_err_over_bound'))} | {_fmt(f.get('max_abs_err'))} | "
                         f"{_fmt(f.get('rel_l2_err'))} | {_fmt(f.get('top1_agreement'))} | "
                         f"`{f.get('worst', '')}` |")
    budgets = budget_rows(results)
    if budgets:
        lines += ["", "## Budgets", "", "Speed verdicts are judged on the median's confidence "
                  "interval: inconclusive when it straddles the limit.", "",
                  "| check | budget | seq | measured | interval | limit | verdict |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| `{b['check']}` | {b['budget']} | {_fmt(b['seq'])} | {_fmt(b['measured'])} | "
                  f"{b['interval']} | {_fmt(b['limit'])} | {b['verdict']} |" for b in budgets]
    split, slowest = time_rows(body)
    if split:
        lines += ["", "## Where the time goes", "", split, "",
                  "| slowest checks | s | " + " | ".join(TIME_HEADS) + " |",
                  "|---|---|" + "---|" * len(TIME_HEADS)]
        lines += [f"| `{row[0]}` | " + " | ".join(row[1:]) + " |" for row in slowest]
    failures = [r for r in results if r["outcome"] in ("failed", "error", "xpassed")]
    if failures:
        lines += ["", "## Failures", ""]
        lines += [f"- `{r['nodeid']}`: {r['reason'].splitlines()[0][:300] if r['reason'] else ''}"
                  for r in failures]
    undecided = [r for r in results if r["outcome"] == "inconclusive"]
    if undecided:
        lines += ["", "## Inconclusive (neither passed nor failed)", ""]
        lines += [f"- `{r['nodeid']}`: {r['reason'].splitlines()[0][:400]}" for r in undecided]
    return "\n".join(lines) + "\n"


TIME_HEADS = ("loading", "golden", "reference", "variant", "proof counting", "rest")


def time_rows(body: dict[str, Any], slowest: int = 10) -> tuple[str, list[list[str]]]:
    """The run's time split and counts as one line, and the slowest checks with their split."""
    from conformance.timing import PHASES, counts_line, golden_line

    summary = body.get("summary", {})
    split, counts = summary.get("time_split_s") or {}, summary.get("counts") or {}
    if not split:
        return "", []
    total = sum(split.values()) or 1.0
    line = (f"{counts_line(counts)}. Check time {total:.1f} s: " + ", ".join(
                f"{name.replace('_', ' ')} {split.get(name, 0.0):.1f} s ({split.get(name, 0.0) / total:.0%})"
                for name in (*PHASES, "rest")))
    line += f". Golden runs: {golden_line(summary.get('golden') or {})}"
    timed = [r for r in body.get("results", []) if r.get("metrics", {}).get("time_split_s")]
    timed.sort(key=lambda r: -r.get("duration_s", 0.0))
    rows = []
    for r in timed[:slowest]:
        own = r["metrics"]["time_split_s"]
        rows.append([r["nodeid"].split("::")[-1], f"{r.get('duration_s', 0.0):.2f}",
                     *(f"{own.get(name, 0.0):.2f}" for name in (*PHASES, "rest"))])
    return line, rows


# ---- plots ------------------------------------------------------------------------------------


def _sweeps(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if r["metrics"].get("sweep")]


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plots(results: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(title, base64 PNG) for every plot there is data for; [] without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = []
    sweeps = _sweeps(results)
    if sweeps:
        out.append(("Speedup against eager vs sequence length (solid: no padding, dashed: padded)",
                    _png(_speed_plot(plt, sweeps))))
        out.append(("Peak memory of the forward vs sequence length (black: the reference)",
                    _png(_memory_plot(plt, sweeps))))
    errors = _error_groups(results)
    if errors:
        out.append(("Distribution of err/bound per variant (1.0 = the tolerance)",
                    _png(_error_plot(plt, errors))))
    return out


def _label(r: dict[str, Any]) -> str:
    return f"{r['variant']} {r['dtype']} {r['model']}"


def _style(r: dict[str, Any]) -> str:
    return "-" if (r.get("padding") or "none") == "none" else "--"


def _speed_plot(plt: Any, sweeps: list[dict[str, Any]]) -> Any:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colours: dict[str, Any] = {}
    for r in sweeps:
        points = r["metrics"]["sweep"]
        colour = colours.setdefault(_label(r), f"C{len(colours) % 10}")
        seqs = [p["seq"] for p in points]
        ax.plot(seqs, [p["speed_ratio"] for p in points], _style(r), marker="o", color=colour,
                label=f"{_label(r)} {'padded' if _style(r) == '--' else ''}".strip())
        ax.fill_between(seqs, [p.get("speed_ratio_q1", p["speed_ratio"]) for p in points],
                        [p.get("speed_ratio_q3", p["speed_ratio"]) for p in points],
                        color=colour, alpha=0.15)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("speedup (eager time / variant time)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def _memory_plot(plt: Any, sweeps: list[dict[str, Any]]) -> Any:
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colours: dict[str, Any] = {}
    references: set[tuple[str, str, str, str]] = set()
    for r in sweeps:
        points = r["metrics"]["sweep"]
        colour = colours.setdefault(_label(r), f"C{len(colours) % 10}")
        seqs = [p["seq"] for p in points]
        mib = [p["variant_peak_bytes"] / 2**20 for p in points]
        exponent = r["metrics"].get("memory_exponent")
        ax.plot(seqs, mib, _style(r), marker="o", color=colour,
                label=f"{_label(r)} {'padded ' if _style(r) == '--' else ''}~seq^{exponent:.2f}")
        key = (r["metrics"].get("reference", "eager"), r["dtype"], r["model"], _style(r))
        if key not in references:
            references.add(key)
            ref_exp = r["metrics"].get("reference_memory_exponent")
            ax.plot(seqs, [p["reference_peak_bytes"] / 2**20 for p in points], _style(r), marker=".",
                    color="black", lw=0.8,
                    label=f"{key[0]} {key[1]} {key[2]} {'padded ' if key[3] == '--' else ''}"
                          f"~seq^{ref_exp:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("peak memory of the forward (MiB)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return fig


def _error_groups(results: list[dict[str, Any]]) -> dict[str, list[float]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for r in results:
        value = r["metrics"].get("err_over_bound")
        if r.get("variant") and isinstance(value, (int, float)) and value == value:
            groups[r["variant"]].append(float(value))
    return {v: groups[v] for v in _variants(results) if v in groups}


def _error_plot(plt: Any, groups: dict[str, list[float]]) -> Any:
    import random

    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.32 * len(groups)))
    names = list(groups)
    data = [groups[n] for n in names]
    try:
        ax.boxplot(data, orientation="horizontal", showfliers=False, widths=0.6)
    except TypeError:  # matplotlib < 3.10
        ax.boxplot(data, vert=False, showfliers=False, widths=0.6)
    jitter = random.Random(0)
    for i, name in enumerate(names, start=1):
        values = groups[name]
        ax.scatter(values, [i + jitter.uniform(-0.18, 0.18) for _ in values], s=6, alpha=0.5)
    ax.set_yticks(range(1, len(names) + 1), [f"{n} ({len(groups[n])})" for n in names], fontsize=7)
    ax.axvline(1.0, color="red", lw=0.8)
    ax.set_xlim(left=0)
    ax.set_xlabel("err / bound per check (worst example of each)")
    ax.grid(alpha=0.3, axis="x")
    return fig


# ---- HTML -------------------------------------------------------------------------------------

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { margin-top: 0; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 2px; }
table { border-collapse: collapse; margin: 8px 0 16px; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
td.cell { text-align: center; white-space: nowrap; cursor: help; font-size: 12px; }
.fail, .regression { color: #a00; font-weight: bold; }
.pass { color: #060; }
.inconclusive { color: #875f00; font-weight: bold; }
dl.env { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; }
dl.env dt { font-weight: bold; } dl.env dd { margin: 0; }
img { max-width: 100%; border: 1px solid #ddd; margin: 6px 0 14px; }
.legend span { display: inline-block; padding: 1px 6px; margin-right: 6px; font-size: 12px; }
code { font-size: 12px; }
"""


def _e(value: Any) -> str:
    return html.escape(_fmt(value), quote=True)


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows]
    return "\n".join(out) + "</table>"


def _matrix_table(claims: list[str], variants: list[str],
                  cells: dict[tuple[str, str], list[dict[str, Any]]]) -> str:
    """Variants down, claims across (fits a screen). Each cell: the outcome counts, coloured by
    its worst outcome, the reasons of its skips and failures in title= (shown on hover)."""
    out = ["<table class='matrix'><tr><th>variant \\ claim</th>"
           + "".join(f"<th>{_e(c)}</th>" for c in claims) + "</tr>"]
    for variant in variants:
        row = [f"<tr><th>{_e(variant)}</th>"]
        for claim in claims:
            rs = cells.get((claim, variant))
            if not rs:
                row.append("<td></td>")
                continue
            counts = _counts(rs)
            summary = f"{claim} x {variant}: " + ", ".join(f"{n} {o}" for o, n in counts.items())
            title = html.escape("\n".join([summary, *_reasons(rs)]), quote=True)
            text = " ".join(f"{n}&nbsp;{SYMBOL.get(o, o)}" for o, n in counts.items())
            row.append(f"<td class='cell' style='background:{COLOUR.get(_worst(rs), '#fff')}' "
                       f"title='{title}'>{text}</td>")
        out.append("".join(row) + "</tr>")
    return "\n".join(out) + "</table>"


def html_page(body: dict[str, Any]) -> str:
    results = body.get("results", [])
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<title>Conformance report</title>", f"<style>{CSS}</style></head><body>",
             "<h1>Conformance report</h1><dl class='env'>"]
    parts += [f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in _header(body)]
    parts.append("</dl>")
    gating = body.get("gating")
    if gating:
        cls = "regression" if gating["regressions"] else "pass"
        parts.append(f"<h2>Release gating</h2><p class='{cls}'>Against {_e(gating.get('baseline'))}: "
                     f"{gating['regressions']} regression(s), {gating.get('inconclusive', 0)} "
                     f"inconclusive, {gating['compared_checks']} checks "
                     f"compared, {gating['ok_rows']} figures unchanged.</p>")
        parts += [f"<p>{_e(n)}</p>" for n in gating.get("notes", [])]
        if gating["rows"]:
            parts.append(_table(
                ["check", "what", "baseline", "current", "band", "verdict", "note"],
                [[f"<code>{_e(r['check'].split('::')[-1])}</code>", _e(r["what"]), _e(r["baseline"]),
                  _e(r["current"]), _e(r["band"]),
                  f"<span class='{_e(r['verdict'])}'>{_e(r['verdict'])}</span>", _e(r["note"])]
                 for r in gating["rows"]]))
    claims, variants, cells = matrix(results)
    parts.append("<h2>Claims x variants</h2><p class='legend'>" + "".join(
        f"<span style='background:{COLOUR[o]}'>{SYMBOL[o]}</span>" for o in OUTCOME_ORDER)
        + " &mdash; hover a cell for its reasons</p>")
    parts.append(_matrix_table(claims, variants, cells))
    figures = variant_figures(results)
    if figures:
        parts.append("<h2>Error figures per variant</h2>")
        parts.append(_table(
            ["variant", "results", "max err/bound", "median err/bound", "max abs err", "max rel L2",
             "min top-1 agreement", "worst"],
            [[_e(f["variant"]), _e(f["results"]), _e(f.get("max_err_over_bound")),
              _e(f.get("median_err_over_bound")), _e(f.get("max_abs_err")), _e(f.get("rel_l2_err")),
              _e(f.get("top1_agreement")), f"<code>{_e(f.get('worst', ''))}</code>"] for f in figures]))
    images = plots(results)
    if images:
        parts.append("<h2>Plots</h2>")
        for title, png in images:
            parts.append(f"<h3>{html.escape(title)}</h3><img alt='{html.escape(title, quote=True)}' "
                         f"src='data:image/png;base64,{png}'>")
    elif _sweeps(results) or _error_groups(results):
        parts.append("<p>Plots need matplotlib (<code>pip install '.[dev]'</code>).</p>")
    budgets = budget_rows(results)
    if budgets:
        parts.append("<h2>Budgets</h2>")
        parts.append("<p>Speed verdicts are judged on the median's confidence interval: "
                     "inconclusive when it straddles the limit.</p>")
        parts.append(_table(["check", "budget", "seq", "measured", "interval", "limit", "verdict",
                             "file"], [
            [f"<code>{_e(b['check'])}</code>", _e(b["budget"]), _e(b["seq"]), _e(b["measured"]),
             _e(b["interval"]), _e(b["limit"]),
             f"<span class='{_e(b['verdict'])}'>{_e(b['verdict'])}</span>", _e(b["file"])]
            for b in budgets]))
    split, slowest = time_rows(body)
    if split:
        parts.append(f"<h2>Where the time goes</h2><p>{_e(split)}</p>")
        parts.append(_table(["slowest checks", "s", *TIME_HEADS],
                            [[f"<code>{_e(row[0])}</code>", *map(_e, row[1:])] for row in slowest]))
    failures = [r for r in results if r["outcome"] in ("failed", "error", "xpassed")]
    if failures:
        parts.append("<h2>Failures</h2><ul>")
        parts += [f"<li><code>{_e(r['nodeid'])}</code>: {_e(r['reason'])}</li>" for r in failures]
        parts.append("</ul>")
    undecided = [r for r in results if r["outcome"] == "inconclusive"]
    if undecided:
        parts.append("<h2>Inconclusive (neither passed nor failed)</h2><ul>")
        parts += [f"<li><code>{_e(r['nodeid'])}</code>: {_e(r['reason'])}</li>" for r in undecided]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.reporting.render",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("report", help="a report directory (holding report.json) or a report.json")
    args = parser.parse_args(argv)
    path = Path(args.report)
    if not (path / "report.json" if path.is_dir() else path).is_file():
        print(f"conformance.reporting.render: {args.report}: no report.json there", file=sys.stderr)
        return 2
    for written in render_dir(path):
        print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
