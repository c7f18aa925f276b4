"""Hypothesis profiles: `dev` (quick, local), `ci` (derandomized, no deadline, no database),
`nightly` (many examples, random seeds: the false-alarm measurement), `scale` (two derandomized
examples a check: the scale benchmark's real-sized checkpoint, conformance/measure/scale.py)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

# filter_too_much: an example the path refuses is rejected (checks.unrefused); a check whose every
# example is refused ends as a skip naming the refusal, not as a failed health check
SLOW_OK = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.differing_executors,
           HealthCheck.filter_too_much]


def register() -> None:
    settings.register_profile("dev", max_examples=8, deadline=None, suppress_health_check=SLOW_OK,
                              print_blob=True)
    try:
        builtin_ci = settings.get_profile("ci")  # hypothesis' own ci profile, where it has one
    except Exception:
        builtin_ci = None
    settings.register_profile("ci", parent=builtin_ci, max_examples=6,
                              deadline=None, database=None, derandomize=True,
                              suppress_health_check=SLOW_OK, print_blob=True)
    settings.register_profile("scale", parent=settings.get_profile("ci"), max_examples=2)
    settings.register_profile("nightly", max_examples=60, deadline=None, derandomize=False,
                              suppress_health_check=SLOW_OK, print_blob=True)
