"""The pytest plugin: options, markers, case expansion, fixtures, header and report.json.

Hooks and fixtures only; torch and transformers are imported when a check first needs them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from conformance import profiles as _profiles
from conformance.claims import CLAIM_IDS, CLAIM_RE
from conformance.compat import DTYPE_NAMES
from conformance.outcomes import not_applicable
from conformance.reporting.report import Record, Report
from conformance.session import USER_MODELS, asked, decide, selection

# xdist: one worker per GPU, each pinned to its own; multi_gpu checks (conformance/gpus.py)
pytest_plugins = ["conformance.gpus"]

PROFILE = pytest.StashKey[str]()
EXPECTATIONS = pytest.StashKey["tuple[list[Any], list[Any]]"]()
UNMATCHED = pytest.StashKey["list[Any]"]()
BUDGETS = pytest.StashKey["list[Any]"]()  # conformance.measure.budgets.Budget, from --budgets or shipped
BASELINE = pytest.StashKey["dict[str, Any]"]()  # --baseline: the previous report.json
GATING = pytest.StashKey["dict[str, Any]"]()  # the comparison with the baseline, once computed


# Profiles exist before Hypothesis' own plugin applies `--hypothesis-profile` (its configure hook
# runs before ours), so `--hypothesis-profile nightly` works with `--pyargs conformance`.
_profiles.register()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance", "optimized-inference conformance")
    group.addoption("--model", action="append", default=[], metavar="PATH_OR_ID",
                    help="checkpoint directory, cached hub id or zoo name; repeatable; replaces the zoo")
    group.addoption("--variant", action="append", default=[], metavar="GLOB",
                    help="run only variants matching this glob (e.g. 'sdpa_*'); repeatable")
    group.addoption("--option", action="append", default=[], metavar="GLOB",
                    help="test_options draws only the forward options matching this glob "
                         "(conformance/options.py; e.g. 'mask_none*'); repeatable")
    group.addoption("--device", default=None, metavar="cpu|cuda|cuda:N",
                    help="device under test (default: cuda if available, else cpu)")
    group.addoption("--dtype", action="append", default=[], choices=DTYPE_NAMES,
                    help="run only these dtypes (default: fp32,bf16 on cpu; fp16,bf16,fp32 on cuda)")
    group.addoption("--threads", type=int, default=None, metavar="N",
                    help="torch CPU threads (default 1: the zoo's models are tiny, and xdist "
                         "workers or a busy runner must not oversubscribe the cores)")
    group.addoption("--xfails-file", action="append", default=[], metavar="FILE",
                    help="tests expected to fail here: one id or id fragment per line, # comments")
    group.addoption("--skips-file", action="append", default=[], metavar="FILE",
                    help="tests to skip here: one id or id fragment per line, # comments")
    group.addoption("--conformance-report", default=None, metavar="DIR",
                    help="write DIR/report.json with every result and its figures, and render "
                         "DIR/report.md and DIR/report.html from it")
    group.addoption("--budgets", action="append", default=[], metavar="FILE",
                    help="speed/memory budget file (TOML; repeatable); runs the budget checks. "
                         "Default with -m budget: the shipped fixtures/budgets/*.toml")
    group.addoption("--baseline", default=None, metavar="OLD/report.json",
                    help="release gating: fail on regressions against this previous report")
    group.addoption("--golden", default="auto", choices=("auto", "fp64", "device"),
                    help="the golden run: eager float64 on the CPU (fp64), eager float32 on the "
                         "device with TF32 off (device), or float64 where the model fits in half "
                         "the available memory (auto, the default; conformance/sizing.py)")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser,
                                  args: list[str]) -> None:
    """`--conformance-report /abs/dir` must not move the rootdir (conformance/rootdir.py); then
    decide whether this run asked for the suite at all: if not, every hook stays quiet."""
    from conformance.rootdir import redetermine

    redetermine(early_config, args)
    if decide(early_config):
        from conformance.gpus import register_xdist_hooks

        register_xdist_hooks(early_config)


def pytest_configure(config: pytest.Config) -> None:
    if not asked(config):  # another project's run: no environment, profile or import changes
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for claim in CLAIM_IDS:
        config.addinivalue_line("markers", f"{claim}: checks documented claim {claim} (SPEC.md)")
    config.addinivalue_line("markers", "smoke: one model through each variant (floor-stack smoke run)")
    config.addinivalue_line("markers", "cases(paddings=None, kinds=None, variant_filter=None, "
                                       "model_filter=None, dtypes=None): how a check expands")
    config.addinivalue_line("markers", "budget: speed/memory budget checks (run with -m budget "
                                       "or --budgets FILE; left out otherwise)")
    _load_hypothesis_profile(config)
    _validate_options(config)
    if config.getoption("conformance_report") or config.getoption("baseline"):
        config.pluginmanager.register(ReportCollector(config), "conformance-report")


def _load_hypothesis_profile(config: pytest.Config) -> None:
    from hypothesis import settings

    from conformance import profiles

    profiles.register()
    chosen = config.getoption("hypothesis_profile", None)
    if chosen is None:
        chosen = "ci" if os.environ.get("CI") else "dev"
        settings.load_profile(chosen)
    config.stash[PROFILE] = chosen


def _validate_options(config: pytest.Config) -> None:
    """Bad input is one clear line and exit code 4, never a traceback."""
    from conformance import variants, zoo

    _, unmatched = variants.select(config.getoption("variant"))
    if unmatched:
        raise pytest.UsageError(
            f"--variant {unmatched[0]!r} matches no variant (known: {', '.join(variants.REGISTRY)})"
        )
    specs = config.getoption("model")
    if specs:
        default = zoo.default_zoo()
        try:
            config.stash[USER_MODELS] = tuple(zoo.resolve(spec, default) for spec in specs)
        except zoo.ZooError as exc:
            raise pytest.UsageError(str(exc)) from None
    device = config.getoption("device")
    if device is not None:
        from conformance.environment import validate_device

        problem = validate_device(device)
        if problem:
            raise pytest.UsageError(problem)
    from conformance.environment import PLAN_DEVICE

    if os.environ.get(PLAN_DEVICE) and not config.option.collectonly:
        raise pytest.UsageError(f"{PLAN_DEVICE} plans a run on a device that is not here: it works "
                                "with --collect-only alone (gpu/run --plan)")
    from conformance.reporting.expectations import ExpectationsError, parse

    try:
        config.stash[EXPECTATIONS] = (
            [e for f in config.getoption("xfails_file") for e in parse(f)],
            [e for f in config.getoption("skips_file") for e in parse(f)],
        )
    except ExpectationsError as exc:
        raise pytest.UsageError(str(exc)) from None
    from conformance.measure.budgets import BudgetError, load, shipped_files

    try:
        config.stash[BUDGETS] = load(config.getoption("budgets") or shipped_files())
    except BudgetError as exc:
        raise pytest.UsageError(str(exc)) from None
    # imported whether or not --baseline is given: Hypothesis draws constants from every loaded
    # local module, so the set of modules must not depend on options or examples would differ
    from conformance.reporting.gating import BaselineError, load_baseline

    if config.getoption("baseline"):
        try:
            config.stash[BASELINE] = load_baseline(config.getoption("baseline"))
        except BaselineError as exc:
            raise pytest.UsageError(str(exc)) from None
    report_dir = config.getoption("conformance_report")
    if report_dir and Path(report_dir).exists() and not Path(report_dir).is_dir():
        raise pytest.UsageError(f"--conformance-report {report_dir}: exists and is not a directory")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames or not asked(metafunc.config):
        return
    from conformance.cases import expand

    marker = metafunc.definition.get_closest_marker("cases")
    options = dict(marker.kwargs) if marker else {}
    # cases(claims=(...)): a check that verifies its own claims (a round-trip), not its variants'
    own_claims = options.pop("claims", None)
    chosen = selection(metafunc.config)
    smoke = _smoke_models(chosen)
    params = []
    for case, reason in expand(chosen, **options):
        marks: list[Any] = [getattr(pytest.mark, claim) for claim in own_claims or case.claims]
        if reason and chosen.env.kind not in case.variant.needs.devices:
            reason = not_applicable(f"{case.variant.id} on {chosen.env.kind}: {reason}")
        if reason:
            marks.append(pytest.mark.skip(reason=reason))
        if metafunc.function.__name__ == "test_logits" and case.model.name in smoke \
                and case.dtype == chosen.dtypes[0] and case.padding in (None, "right"):
            marks.append(pytest.mark.smoke)
        params.append(pytest.param(case, id=case.id, marks=marks))
    metafunc.parametrize("case", params)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Apply expectation files. Expected failures of Hypothesis-driven checks become skips
    (xfail plus shrinking is slow and flaky); plain tests get a strict xfail."""
    if not asked(config):
        return
    from conformance.measure.budgets import requested
    from conformance.reporting.expectations import matches

    run_budgets = requested(config)  # budget checks are left out of the quick run (budgets.py)
    left_out = [item for item in items if item.get_closest_marker("budget") and (
        not run_budgets or not hasattr(getattr(item, "callspec", None) and
                                       item.callspec.params.get("budget"), "case"))]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item not in left_out]
    xfails, skips = config.stash.get(EXPECTATIONS, ([], []))
    used = set()
    for item in items:
        for entry in skips:
            if matches(entry, item.nodeid):
                used.add(entry)
                item.add_marker(pytest.mark.skip(reason=f"skips file {entry.where}: {entry.reason}"))
        for entry in xfails:
            if matches(entry, item.nodeid):
                used.add(entry)
                reason = f"expected failure, {entry.where}: {entry.reason}"
                if item.get_closest_marker("cases") is not None:
                    item.add_marker(pytest.mark.skip(reason=reason))
                else:
                    item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
    config.stash[UNMATCHED] = [e for e in xfails + skips if e not in used]
    from conformance.ordering import run_order

    chosen = selection(config)  # each model, then dtype, then variant together: one load each
    items[:] = run_order(items, chosen.models, chosen.dtypes, chosen.variants)


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config) -> Any:
    """An inconclusive verdict (a skip whose reason starts "inconclusive:", conformance/reporting/report.py)
    is its own terminal category: "N inconclusive" in the summary line, neither passed nor
    skipped, and, like a skip, never a reason for a non-zero exit."""
    if report.skipped and asked(config) and _outcome(report)[0] == "inconclusive":
        return "inconclusive", "?", ("INCONCLUSIVE", {"yellow": True})
    return None


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if not asked(config):
        return
    for report in terminalreporter.stats.get("inconclusive", []):
        terminalreporter.write_line(f"INCONCLUSIVE {report.nodeid}: {_outcome(report)[1]}",
                                    yellow=True)
    for entry in config.stash.get(UNMATCHED, []):
        terminalreporter.write_line(
            f"conformance: expectation {entry.where} {entry.pattern!r} matched no test",
            yellow=True,
        )
    from conformance.timing import counts_line, golden_line

    spent = _time_totals(terminalreporter)
    if any(spent["counts"].values()):
        counts, split = spent["counts"], spent["time_split_s"]
        terminalreporter.write_line(
            f"conformance: {counts_line(counts)}; time: "
            + ", ".join(f"{name.replace('_', ' ')} {seconds:.1f} s" for name, seconds in split.items())
            + f"; golden runs: {golden_line(spent['golden'])}")
    skipped = terminalreporter.stats.get("skipped", [])
    inapplicable = [r for r in skipped if _outcome(r)[0] == "not_applicable"]
    if inapplicable:
        terminalreporter.write_line(
            f"conformance: {len(inapplicable)} of {len(skipped)} skipped checks are not applicable "
            "on this device (not failures; see the skip reasons)")
    if GATING in config.stash:
        from conformance.reporting.gating import table_lines

        gating = config.stash[GATING]
        for line in table_lines(gating):
            terminalreporter.write_line(line, red=bool(gating["regressions"]))


def _time_totals(terminalreporter: Any) -> dict[str, Any]:
    """The run's loads, forwards and time split, summed over the checks' teardown reports (the
    controller sees the workers' reports under xdist)."""
    from conformance.timing import totals

    records = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "teardown":
                continue
            info = next((v for k, v in getattr(report, "user_properties", ()) if k == "conformance"),
                        None)
            if info is not None:
                records.append(info)
    return totals(records)


def _smoke_models(chosen: Any) -> set[str]:
    first: dict[str, str] = {}
    for model in chosen.models:
        first.setdefault(model.kind, model.name)
    return set(first.values())


@pytest.fixture(scope="session")
def conformance_selection(request: pytest.FixtureRequest) -> Any:
    return selection(request.config)


@pytest.fixture(scope="session")
def model_cache(conformance_selection: Any, tmp_path_factory: pytest.TempPathFactory,
                request: pytest.FixtureRequest) -> Any:
    """Every model loads once per session; zoo configs are materialized into a temp dir."""
    from conformance.running import ModelCache

    return ModelCache(tmp_path_factory.mktemp("zoo"), conformance_selection.env.device,
                      golden=request.config.getoption("golden"))


@pytest.fixture
def metrics(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Figures a check measured; they land in report.json under this test's record."""
    return _info(request.node)["metrics"]


def _info(item: pytest.Item) -> dict[str, Any]:
    for key, value in item.user_properties:
        if key == "conformance":
            return value
    from conformance.ordering import case_of

    case = case_of(item)
    info = {
        "check": item.originalname.removeprefix("test_") if hasattr(item, "originalname")
        else item.name,
        "claims": sorted({m.name for m in item.iter_markers() if CLAIM_RE.match(m.name)}),
        "model": case.model.name if case else None,
        "variant": case.variant.id if case else None,
        "dtype": case.dtype if case else None,
        "padding": case.padding if case else None,
        "metrics": {},
    }
    item.user_properties.append(("conformance", info))
    return info


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if asked(item.config):
        _info(item)
        from conformance.compare import judge_against
        from conformance.timing import open_ledger

        open_ledger()  # where this check's time goes (conformance/timing.py)
        judge_against("fp64")  # until the check asks for its golden run (compare._GOLDEN_DTYPE)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """Examples the path refused (checks.unrefused) are counted in the check's metrics; when every
    example was refused, Hypothesis has nothing to judge and the check is a skip with the reason."""
    if not asked(item.config):
        return (yield)
    from hypothesis.errors import FailedHealthCheck, Unsatisfiable

    from conformance.checks import REFUSALS

    REFUSALS.reset()
    try:
        return (yield)
    except (Unsatisfiable, FailedHealthCheck):
        if not REFUSALS.reasons:
            raise
        pytest.skip(f"every example was refused ({len(REFUSALS.reasons)} tried), the first: "
                    f"{REFUSALS.reasons[0]}")
    finally:
        if REFUSALS.reasons:
            _info(item)["metrics"].update(refused_examples=len(REFUSALS.reasons),
                                          first_refusal=REFUSALS.reasons[0])
        REFUSALS.example = None  # the last example's context is not kept alive past its check


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    if asked(item.config):
        from conformance.timing import close_ledger

        found = close_ledger()
        if found is not None:
            _info(item)["metrics"].update(found)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Any:
    """No check may change torch's default dtype for the checks after it. When from_pretrained
    raises, transformers 4.48 leaves the default dtype set to the load's dtype, and the models
    built after that in the process (materialized zoo models, ONNX exports) silently change.
    Which checks that hit depended on test order, so serial and xdist runs differed."""
    import sys

    if not asked(item.config):
        yield
        return
    torch = sys.modules.get("torch")
    before = torch.get_default_dtype() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_default_dtype() != (before or torch.float32):
        torch.set_default_dtype(before or torch.float32)


class ReportCollector:
    """Registered only with --conformance-report: folds every phase report into one record."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.report = Report(environment={})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        info = next((v for k, v in report.user_properties if k == "conformance"), None)
        if info is None:
            return
        record = self.report.records.get(report.nodeid)
        if record is None:
            record = self.report.records[report.nodeid] = Record(
                report.nodeid, info["check"], info["claims"], info["model"], info["variant"],
                info["dtype"], info["padding"],
            )
        record.duration_s += report.duration
        record.metrics.update(info.get("metrics", {}))
        outcome, reason = _outcome(report)
        # the call phase decides; a skip/failure in setup or an error in teardown overrides a pass
        decisive = report.when == "call" or outcome != "passed"
        if decisive and (record.outcome == "passed" or outcome in ("failed", "error")):
            record.outcome, record.reason = outcome, reason or record.reason

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput"):
            return
        self.report.environment = _environment(self.config)
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        if BASELINE in self.config.stash:
            from conformance.reporting.gating import compare

            current = {"environment": self.report.environment,
                       "results": [r.as_json() for r in self.report.records.values()]}
            gating = self.report.gating = self.config.stash[GATING] = compare(
                self.config.stash[BASELINE], current)
            if gating["regressions"] and session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if not self.config.getoption("conformance_report"):
            return
        path = self.report.write(Path(self.config.getoption("conformance_report")))
        if tr is not None:
            tr.write_line(f"conformance report: {path}")
        try:
            from conformance.reporting.render import render_dir

            pages = render_dir(path.parent)
        except Exception as exc:  # the human pages must never change the run's verdict
            pages = [f"not rendered ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"]
        if tr is not None:
            tr.write_line(f"conformance pages: {', '.join(map(str, pages))}")


def _outcome(report: pytest.TestReport) -> tuple[str, str]:
    if hasattr(report, "wasxfail"):
        return ("xfailed" if report.skipped else "xpassed"), str(report.wasxfail)
    if report.skipped:
        from conformance.outcomes import skip_outcome

        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        return skip_outcome(reason), reason
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)
        return ("failed" if report.when == "call" else "error"), message.strip()
    return "passed", ""


def _environment(config: pytest.Config) -> dict[str, Any]:
    from hypothesis import settings

    env = selection(config).env.describe()
    env["hypothesis"] = {
        "profile": config.stash.get(PROFILE, None),
        "seed": config.getoption("hypothesis_seed", None),
        "derandomize": settings.default.derandomize,
        "max_examples": settings.default.max_examples,
    }
    env["stack"] = os.environ.get("CONFORMANCE_STACK")
    from conformance.gpus import worker_pins

    pins = worker_pins(config)
    if pins:  # an xdist run: which worker ran on which GPU
        env["xdist_workers"] = pins
    return env


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not asked(config):
        return []
    from conformance.environment import package_versions

    versions = ", ".join(f"{k} {v}" for k, v in package_versions().items() if v)
    lines = [f"conformance: {versions}"]
    if config.getoption("device") or _suite_requested(config):
        env = selection(config).env
        cc = ".".join(map(str, env.capability)) if env.capability else "-"
        lines.append(f"conformance device: {env.device} ({env.name}), compute capability {cc}, "
                     f"driver {env.driver or '-'}")
    seed = config.getoption("hypothesis_seed", None)
    lines.append(f"conformance hypothesis: profile={config.stash.get(PROFILE, None)} "
                 f"seed={seed if seed is not None else 'derandomized/random per run'}")
    return lines


def _suite_requested(config: pytest.Config) -> bool:
    args = " ".join(str(a) for a in config.args)
    return "conformance" in args or config.getoption("pyargs", False)
