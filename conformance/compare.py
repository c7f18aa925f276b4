"""How two outputs are compared: real-token positions only, finiteness everywhere it is owed.

Every function returns (failure message or None, figures); messages say what differed and where.
"""

from __future__ import annotations

from typing import Any

from conformance import tolerances
from conformance.compat import parse_dtype


def eps(dtype: str) -> float:
    import torch

    return float(torch.finfo(parse_dtype(dtype)).eps)


def _where(index: Any, shape: Any) -> str:
    import numpy as np

    pos = np.unravel_index(int(index), tuple(shape))
    return f"row {pos[0]}, position {pos[1]}"


def finiteness(variant: Any, reference: Any, golden: Any, real: Any) -> str | None:
    """No NaN/Inf on a real token where golden is finite; none anywhere the reference is finite."""
    import torch

    problem = golden_defined(golden, real)
    if problem:
        return problem
    bad_real = real[..., None] & torch.isfinite(golden) & ~torch.isfinite(variant)
    if bad_real.any():
        rows = sorted({int(r) for r in bad_real.nonzero()[:, 0]})
        return f"non-finite output on real tokens of rows {rows} where the golden run is finite"
    bad_pad = torch.isfinite(reference) & ~torch.isfinite(variant)
    if bad_pad.any():
        rows = sorted({int(r) for r in bad_pad.nonzero()[:, 0]})
        return f"non-finite output at padded positions of rows {rows} where the reference is finite"
    return None


def golden_defined(golden: Any, real: Any) -> str | None:
    """A golden run that is not finite on a real token cannot judge anything: say so, loudly."""
    import torch

    bad = real[..., None] & ~torch.isfinite(golden)
    if bad.any():
        rows = sorted({int(r) for r in bad.nonzero()[:, 0]})
        return f"golden run is non-finite on real tokens of rows {rows}: nothing to compare against"
    return None


def kernel_verdict(
    variant: Any, reference: Any, golden: Any, real: Any, dtype: str
) -> tuple[str | None, dict[str, float]]:
    """max|variant - golden| <= K * max|reference - golden| + floor, on real tokens."""
    tol = tolerances.kernel(dtype)
    sel = real[..., None].expand_as(golden)
    err = (variant - golden).abs()[sel]
    ref_err = (reference - golden).abs()[sel]
    scale = float(golden.abs()[sel].max())
    floor = tol.floor_ulps * eps(dtype) * scale
    bound = tol.k * float(ref_err.max()) + floor
    worst = float(err.max())
    figures = {
        "max_abs_err": worst,
        "ref_max_abs_err": float(ref_err.max()),
        "bound": bound,
        "err_over_bound": worst / bound if bound > 0 else float("inf"),
        "err_over_ref_err": worst / float(ref_err.max()) if float(ref_err.max()) > 0 else 0.0,
        "golden_max_abs": scale,
        "k": tol.k,
        "floor": floor,
    }
    if worst > bound:
        flat = (variant - golden).abs().masked_fill(~real[..., None], 0).argmax()
        return (
            f"max|variant - golden| = {worst:.3g} > bound {bound:.3g} "
            f"(= {tol.k} x reference error {float(ref_err.max()):.3g} + floor {floor:.3g}) "
            f"at {_where(flat // golden.shape[-1], golden.shape[:-1])}",
            figures,
        )
    return None, figures


def quant_verdict(
    variant: Any, golden: Any, real: Any, dtype: str, scheme: str, kind: str
) -> tuple[str | None, dict[str, float]]:
    """||variant - golden|| / ||golden|| on real tokens under the scheme's bound; top-1 recorded."""
    tol = tolerances.quant(scheme, dtype)
    v, g = variant[real], golden[real]
    rel = float((v - g).norm() / g.norm()) if float(g.norm()) > 0 else 0.0
    figures = {"rel_l2_err": rel, "bound": tol.max_rel_l2, "err_over_bound": rel / tol.max_rel_l2}
    if kind == "decoder":
        figures["top1_agreement"] = float((v.argmax(-1) == g.argmax(-1)).double().mean())
    if rel > tol.max_rel_l2:
        return (f"{scheme} output moved too far: ||variant - golden|| / ||golden|| = {rel:.3g} > "
                f"{tol.max_rel_l2} ({scheme}, {dtype})", figures)
    return None, figures


def on_real(out: Any, mask: Any) -> Any:
    """The real-token positions of a [B, W, V] output, in row order, as [N, V]."""
    return out[mask.bool()]


def invariance_verdict(
    got: Any, want: Any, noise: float, scale: float, dtype: str, what: str
) -> tuple[str | None, dict[str, float]]:
    """Two runs of one variant that must agree ([N, V] each, real tokens): their difference may be
    at most K x the plain reference's own rounding error on these sequences, plus a floor."""
    import torch

    tol = tolerances.invariance(dtype)
    floor = tol.floor_ulps * eps(dtype) * scale
    bound = tol.k * noise + floor
    finite = torch.isfinite(want)
    if (finite & ~torch.isfinite(got)).any():
        where = int((finite & ~torch.isfinite(got)).any(-1).nonzero()[0])
        return f"{what}: non-finite output at real token {where} where the other run is finite", {}
    diff = (got - want).abs().masked_fill(~finite, 0)
    worst = float(diff.max()) if diff.numel() else 0.0
    figures = {"max_abs_diff": worst, "noise": noise, "bound": bound,
               "err_over_bound": worst / bound if bound > 0 else float("inf"), "k": tol.k, "floor": floor}
    if worst > bound:
        token = int(diff.amax(-1).argmax())
        return (f"{what}: max|difference| = {worst:.3g} > bound {bound:.3g} (= {tol.k} x reference "
                f"rounding error {noise:.3g} + floor {floor:.3g}) at real token {token}", figures)
    return None, figures


def spread_verdict(
    got: Any, want: Any, scheme: str, dtype: str, what: str
) -> tuple[str | None, dict[str, Any]]:
    """For a path whose rows depend on the batch by design: the two runs may differ by at most the
    scheme's own error bound, ||got - want|| / ||want|| <= tolerances.QUANT[scheme]."""
    import torch

    bound = tolerances.quant(scheme, dtype).max_rel_l2
    finite = torch.isfinite(want) & torch.isfinite(got)
    if not bool(finite.all()):
        return f"{what}: non-finite output on real tokens", {}
    norm = float(want.norm())
    rel = float((got - want).norm()) / norm if norm > 0 else 0.0
    figures = {"rel_l2_spread": rel, "bound": bound, "err_over_bound": rel / bound}
    if rel > bound:
        return (f"{what}: ||difference|| / ||output|| = {rel:.3g} > {bound} (the {scheme} scheme's "
                "bound)", figures)
    return None, figures
