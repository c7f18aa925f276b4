"""How two outputs are compared: real-token positions only, finiteness everywhere it is owed.

Every function returns (failure message or None, figures); messages say what differed and where.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from conformance import tolerances
from conformance.compat import parse_dtype

# The dtype of the golden run the current check judges against: ModelCache.golden sets it, the
# plugin resets it to float64 before every check. Where golden is no finer than the dtype judged (a
# checkpoint too big for a float64 golden run, sizing.golden_choice), the reference's measured
# error against it estimates nothing (two float32 eager runs agree to the bit), so the noise unit
# is the reference's envelope itself (noise_unit).
_GOLDEN_DTYPE: ContextVar[str] = ContextVar("golden_dtype", default="fp64")


def judge_against(golden_dtype: str) -> None:
    """The checks that follow compare with a golden run in `golden_dtype`."""
    _GOLDEN_DTYPE.set(golden_dtype)


def golden_dtype() -> str:
    return _GOLDEN_DTYPE.get()


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


def reference_envelope(dtype: str, scale: float) -> float:
    """How far the plain same-dtype path may be from golden: an absolute envelope, a measured
    multiple of eps(dtype) x max|golden| (tolerances.REFERENCE_ENVELOPE_ULPS)."""
    return tolerances.reference_envelope_ulps(dtype) * eps(dtype) * scale


def reference_verdict(
    reference: Any, golden: Any, real: Any, dtype: str, model: str
) -> tuple[str | None, dict[str, float]]:
    """REF: the plain same-dtype path itself within its envelope of golden, on real tokens. Its
    bound does not depend on the reference's own error, so a broken plain path fails here."""
    sel = real[..., None].expand_as(golden)
    ref_err = float((reference - golden).abs()[sel].max())
    scale = float(golden.abs()[sel].max())
    envelope = reference_envelope(dtype, scale)
    figures = {"ref_max_abs_err": ref_err, "ref_envelope": envelope,
               "ref_ulps": ref_err / (eps(dtype) * scale) if scale > 0 else 0.0,
               "ref_over_envelope": ref_err / envelope if envelope > 0 else float("inf")}
    if ref_err > envelope:
        flat = (reference - golden).abs().masked_fill(~real[..., None], 0).argmax()
        return (f"REF failure: plain eager {dtype} on {model}: max|reference - golden| = "
                f"{ref_err:.3g} > envelope {envelope:.3g} (= "
                f"{tolerances.reference_envelope_ulps(dtype):g} x eps({dtype}) x max|golden| "
                f"{scale:.3g}) at {_where(flat // golden.shape[-1], golden.shape[:-1])}", figures)
    return None, figures


def noise_unit(ref_err: float, scale: float, dtype: str) -> float:
    """The plain reference's rounding error a bound is made of: its measured error against golden
    capped at its envelope, so a broken plain path never widens a bound; the envelope itself where
    golden is no finer than `dtype` (see _GOLDEN_DTYPE)."""
    envelope = reference_envelope(dtype, scale)
    if eps(golden_dtype()) >= eps(dtype):
        return envelope
    return min(ref_err, envelope)


def kernel_bound(ref_err: float, scale: float, dtype: str, kind: str = "") -> tuple[float, float, float]:
    """(bound, reference error used, floor): K * noise_unit + floor_ulps * eps * scale, the one
    formula every kernel-class verdict (logits, generation's near ties) applies."""
    tol = tolerances.kernel(dtype, kind)
    used = noise_unit(ref_err, scale, dtype)
    return tol.bound(used, eps(dtype), scale), used, tol.floor(eps(dtype), scale)


def kernel_verdict(
    variant: Any, reference: Any, golden: Any, real: Any, dtype: str, kind: str = ""
) -> tuple[str | None, dict[str, float]]:
    """max|variant - golden| <= K * min(max|reference - golden|, envelope) + floor, on real
    tokens: the reference's error counts only up to its own envelope, so a broken plain path (or
    a bug shared with it) never widens a variant's bound. `kind`: a model kind's own floor."""
    tol = tolerances.kernel(dtype, kind)
    sel = real[..., None].expand_as(golden)
    err = (variant - golden).abs()[sel]
    ref_err = float((reference - golden).abs()[sel].max())
    scale = float(golden.abs()[sel].max())
    envelope = reference_envelope(dtype, scale)
    bound, used, floor = kernel_bound(ref_err, scale, dtype, kind)
    worst = float(err.max())
    figures = {
        "max_abs_err": worst,
        "ref_max_abs_err": ref_err,
        "ref_envelope": envelope,
        "ref_ulps": ref_err / (eps(dtype) * scale) if scale > 0 else 0.0,
        "bound": bound,
        "err_over_bound": worst / bound if bound > 0 else float("inf"),
        "err_over_ref_err": worst / ref_err if ref_err > 0 else 0.0,
        "ref_err_used": used,
        "golden_max_abs": scale,
        "k": tol.k,
        "floor": floor,
    }
    if worst > bound:
        flat = (variant - golden).abs().masked_fill(~real[..., None], 0).argmax()
        capped = (" (capped at its envelope)" if used < ref_err else
                  f" (its envelope: the golden run is {golden_dtype()}, no finer)" if used > ref_err else "")
        return (
            f"max|variant - golden| = {worst:.3g} > bound {bound:.3g} "
            f"(= {tol.k} x reference error {used:.3g}{capped} + floor {floor:.3g}) "
            f"at {_where(flat // golden.shape[-1], golden.shape[:-1])}",
            figures,
        )
    return None, figures


def variant_verdict(
    record: Any, variant: Any, reference: Any, golden: Any, real: Any, dtype: str, kind: str
) -> tuple[str | None, dict[str, float]]:
    """The rule a registry record declares (`Variant.tolerance`): a kernel-class path against K x
    the reference's error, a quantized one against its scheme's relative-L2 bound."""
    if record.kernel_class:
        return kernel_verdict(variant, reference, golden, real, dtype, kind)
    return quant_verdict(variant, golden, real, dtype, record.tolerance, kind)


def agreement_verdict(
    out: Any, golden: Any, real: Any, ulps: float, what: str
) -> tuple[str | None, dict[str, float]]:
    """Two implementations in float64 on real tokens: max|out - golden| <= ulps x eps(fp64) x
    max|golden|. No reference error enters: float64 leaves nothing for a wrong integration to
    hide in (a wrong mask shows as 1e-1 against 1e-12)."""
    import torch

    sel = real[..., None].expand_as(golden)
    if (sel & torch.isfinite(golden) & ~torch.isfinite(out)).any():
        rows = sorted({int(r) for r in (real[..., None] & ~torch.isfinite(out)).nonzero()[:, 0]})
        return f"{what}: non-finite output on real tokens of rows {rows} where eager is finite", {}
    scale = float(golden.abs()[sel].max())
    bound = ulps * eps("fp64") * scale
    worst = float((out - golden).abs()[sel].max())
    figures = {"max_abs_err": worst, "bound": bound, "golden_max_abs": scale,
               "ulps": worst / (eps("fp64") * scale) if scale > 0 else 0.0,
               "err_over_bound": worst / bound if bound > 0 else float("inf")}
    if worst > bound:
        flat = (out - golden).abs().masked_fill(~real[..., None], 0).argmax()
        return (f"{what}: max|difference| = {worst:.3g} > float64 envelope {bound:.3g} (= {ulps:g} x "
                f"eps(fp64) x max|golden| {scale:.3g}) at "
                f"{_where(flat // golden.shape[-1], golden.shape[:-1])}", figures)
    return None, figures


def quant_verdict(
    variant: Any, golden: Any, real: Any, dtype: str, scheme: str, kind: str
) -> tuple[str | None, dict[str, float]]:
    """||variant - golden|| / ||golden|| on real tokens under the scheme's bound; top-1 recorded."""
    tol = tolerances.quant(scheme)
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

    tol = tolerances.kernel(dtype)
    floor, bound = tol.floor(eps(dtype), scale), tol.bound(noise, eps(dtype), scale)
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
    got: Any, want: Any, scheme: str, what: str
) -> tuple[str | None, dict[str, Any]]:
    """For a path whose rows depend on the batch by design: the two runs may differ by at most the
    scheme's own error bound, ||got - want|| / ||want|| <= tolerances.QUANT[scheme]."""
    import torch

    bound = tolerances.quant(scheme).max_rel_l2
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
