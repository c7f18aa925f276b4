"""Where a failing output first went wrong: the first layer whose output leaves its bound.

A red cell says "logits differ"; a bug report needs where the difference starts. On a failing
example the suite re-runs the call under suspicion with forward hooks on every layer (and, inside
each layer, on its attention and its MLP), and does the same for the golden run (each row alone,
float64 eager) and the plain reference (eager, the run's dtype). At each point, in the order the
model computes them, the variant's error against golden is judged by the same formula as the
logits (``compare.kernel_bound``: K times the reference's own error at that point, plus a floor
of ulps of the point's scale). The first point out of bound is the divergence:

    first divergence: layer 1 self_attn (err 3.1e-01 vs bound 2.0e-05); layers 0 clean

Two runs of one variant that must agree (batch invariance, packed rows, a fully padded row,
determinism) are localized between themselves (``between``): both calls traced, each point's
outputs on the same real tokens compared with the invariance bound at that point, in units of the
plain reference's own rounding error there (its error against golden, capped at its envelope):

    first divergence between the two runs: layer 0 the layer output (diff 3.1e-02 vs bound 4.0e-06)

Hooks, not ``output_hidden_states``: an option under suspicion may be that very flag. Paths
whose modules are replaced (BetterTransformer's fused layers, an ONNX graph) show what hooks
still see; where no layer list is found the localization says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from conformance import compare

# what a failure of a path judged by its quantization scheme says instead: per-layer kernel bounds
# would name layer 0 for every such path (its error is expected at every layer, by design)
NOT_LOCALIZED = ("no localization: a quantized path is judged on its output by its scheme's bound "
                 "(its error is expected at every layer)")
LAYER_LISTS = ("model.layers", "layers", "transformer.h", "h", "encoder.layer", "transformer.layer",
               "gpt_neox.layers", "model.decoder.layers", "decoder.layers", "layer")
ATTENTION = re.compile(r"^(self_attn|attn|attention|self_attention)$")
MLP = re.compile(r"^(mlp|feed_forward|ffn|intermediate)$")
Point = tuple[int, str]  # (layer, "self_attn" | "mlp" | "output")
ORDER = {"self_attn": 0, "mlp": 1, "output": 2}


def layer_list(model: Any) -> Any | None:
    for name in LAYER_LISTS:
        module = model
        try:
            for part in name.split("."):
                module = getattr(module, part)
        except AttributeError:
            continue
        if hasattr(module, "__len__") and len(module) > 0:
            return module
    return None


def _first_tensor(output: Any) -> Any:
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return getattr(output, "last_hidden_state", None)


def trace(model: Any, run: Callable[[], Any]) -> dict[Point, Any] | None:
    """Every layer's (and its attention's and MLP's) output during `run()`, float64 on CPU;
    outputs of several forwards (cached decoding) are joined along the sequence."""
    import torch

    layers = layer_list(model)
    if layers is None:
        return None
    seen: dict[Point, list[Any]] = {}
    handles = []

    def hook_for(point: Point) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is not None and tensor.dim() == 3:
                seen.setdefault(point, []).append(tensor.detach().to("cpu", torch.float64))
        return hook

    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(hook_for((index, "output"))))
        for name, child in layer.named_children():
            kind = "self_attn" if ATTENTION.match(name) else "mlp" if MLP.match(name) else None
            if kind is not None:
                handles.append(child.register_forward_hook(hook_for((index, kind))))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return {point: torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            for point, parts in seen.items()}


def on_real(traced: dict[Point, Any], mask: Any) -> dict[Point, Any]:
    return {point: compare.on_real(t, mask) for point, t in traced.items()
            if t.shape[:2] == tuple(mask.shape)}


def per_row(model: Any, rows: list[Any],
            run_row: Callable[[Any], Callable[[], Any]]) -> dict[Point, Any] | None:
    """Traces of each row run alone, joined over rows on their real tokens."""
    import torch

    parts: dict[Point, list[Any]] = {}
    for row in rows:
        traced = trace(model, run_row(row))
        if traced is None:
            return None
        for point, tensor in traced.items():
            parts.setdefault(point, []).append(tensor[0])
    return {point: torch.cat(ts, dim=0) for point, ts in parts.items()}


def _in_order(*traces: dict[Point, Any]) -> list[Point]:
    """The points every trace has, in the order the model computes them."""
    common = set(traces[0]).intersection(*traces[1:])
    return sorted(common, key=lambda p: (p[0], ORDER[p[1]]))


def _checked(traces: tuple[dict[Point, Any], ...],
             measure: Callable[..., tuple[float, float]]) -> list[tuple[Point, float, float]]:
    """(point, value, bound) in compute order, `measure` given each trace's tensor at the point
    (points whose shapes differ skipped), up to and including the first value out of its bound."""
    checked = []
    for point in _in_order(*traces):
        tensors = [t[point] for t in traces]
        if any(t.shape != tensors[-1].shape for t in tensors):
            continue
        checked.append((point, *measure(*tensors)))
        if not checked[-1][1] <= checked[-1][2]:
            break
    return checked


def _first_out(checked: list[tuple[Point, float, float]], head: str, measure: str) -> dict[str, Any] | None:
    """The first (point, value, bound) whose value leaves its bound, with the message naming it
    and the layers before it; None when every point is within."""
    for index, (point, value, bound) in enumerate(checked):
        if not value <= bound:
            clean = sorted({p[0] for p, _, _ in checked[:index] if p[0] < point[0]})
            before = f"layers {', '.join(map(str, clean))} clean" if clean else "no layer before it"
            where = "the layer output" if point[1] == "output" else point[1]
            return {"layer": point[0], "point": point[1], measure: value, "bound": bound,
                    "text": f"{head}: layer {point[0]} {where} ({measure} {value:.2g} vs bound "
                            f"{bound:.2g}); {before}"}
    return None


def _max_abs(a: Any, b: Any) -> float:
    return float((a - b).abs().nan_to_num(float("inf")).max())


def first_divergence(variant: dict[Point, Any] | None, reference: dict[Point, Any] | None,
                     golden: dict[Point, Any] | None, dtype: str, kind: str = "") -> dict[str, Any]:
    """The first point where the variant's error against golden leaves its kernel bound (the
    model kind's, as the logits' verdict)."""
    if variant is None or reference is None or golden is None:
        return {"text": "localization unavailable: no layer list found in this model"}
    checked = _checked((variant, reference, golden), lambda v, r, g: (
        _max_abs(v, g), compare.kernel_bound(_max_abs(r, g), float(g.abs().max()), dtype, kind)[0]))
    if not checked:
        return {"text": "localization unavailable: the hooked points do not line up with golden"}
    return _first_out(checked, "first divergence", "err") or {
        "text": f"every layer within its bound ({len(checked)} points): the difference starts "
                "after the last layer (final norm, head, or the output's own computation)"}


def _failed(exc: Exception) -> dict[str, Any]:
    """A localization that raised: a diagnosis never replaces the verdict, so it says so."""
    return {"text": f"localization failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}


def _unit_traces(reference: Any, golden: Any, batch: Any, ids: Any, mask: Any) -> tuple[Any, Any]:
    """The plain reference's trace on the padded batch and golden's on the same real tokens (each
    row alone, or the padded batch itself where golden is not per row: checks.golden_per_row)."""
    import torch

    from conformance.checks import golden_per_row
    from conformance.running import call_model, plain_inputs

    def padded(loaded: Any) -> Callable[[], Any]:
        return lambda: call_model(loaded, plain_inputs(loaded, ids, mask))

    plain = trace(reference.model, padded(reference))
    if golden_per_row(golden.zoo.kind, batch.padding):
        rows = [ids[i][mask[i].bool()] for i in range(len(batch.lengths))]
        gold = per_row(golden.model, rows, lambda row: lambda: call_model(
            golden, plain_inputs(golden, row[None], torch.ones_like(row[None]))))
    else:
        whole = trace(golden.model, padded(golden))
        gold = on_real(whole, mask) if whole is not None else None
    return on_real(plain, mask) if plain is not None else None, gold


def localize(variant: Any, reference: Any, golden: Any, batch: Any, dtype: str,
             run_variant: Callable[[], Any] | None = None) -> dict[str, Any]:
    """The first divergence of `variant` (Loaded) on `batch`: its call (`run_variant`, default the
    plain padded forward) traced against the golden run and the plain reference."""
    from conformance.running import call_model, plain_inputs

    ids, mask = batch.materialize(variant.vocab_size, variant.pad_id)
    try:
        traced = trace(variant.model, run_variant or (
            lambda: call_model(variant, plain_inputs(variant, ids, mask))))
        plain, gold = _unit_traces(reference, golden, batch, ids, mask)
    except Exception as exc:
        return _failed(exc)
    return first_divergence(on_real(traced, mask) if traced is not None else None, plain, gold, dtype,
                            variant.zoo.kind)


def between(first: dict[Point, Any] | None, second: dict[Point, Any] | None,
            reference: dict[Point, Any] | None, golden: dict[Point, Any] | None,
            dtype: str, exact: bool = False) -> dict[str, Any]:
    """The first point where two runs of one variant ([N, H] each, the same real tokens in the
    same order) part by more than the invariance bound there: the logits' formula
    (compare.kernel_bound) with the plain reference's rounding error at that point (against
    golden, capped at its envelope) as the unit; `exact`: by anything at all (determinism is
    bitwise)."""
    if first is None or second is None or reference is None or golden is None:
        return {"text": "localization unavailable: no layer list found in this model"}
    checked = _checked((first, second, reference, golden), lambda a, b, r, g: (
        _max_abs(a, b),
        0.0 if exact else compare.kernel_bound(_max_abs(r, g), float(g.abs().nan_to_num().max()), dtype)[0]))
    if not checked:
        return {"text": "localization unavailable: the hooked points of the two runs do not line up"}
    return _first_out(checked, "first divergence between the two runs", "diff") or {
        "text": f"the two runs agree at every layer ({len(checked)} points): they part after the "
                "last layer (final norm, head, or the output's own computation)"}


def two_runs(variant: Any, reference: Any, golden: Any, batch: Any, dtype: str,
             run_first: Callable[[], Any], select_first: Callable[[Any], Any],
             run_second: Callable[[], Any], select_second: Callable[[Any], Any],
             exact: bool = False) -> dict[str, Any]:
    """`between` for two calls of `variant` (Loaded): `select_*` maps a traced [B, W, H] output to
    the [N, H] real tokens of `batch`'s rows in row order; the unit comes from the plain reference
    and golden traced on the same rows (`_unit_traces`, as `localize` does)."""
    ids, mask = batch.materialize(variant.vocab_size, variant.pad_id)
    try:
        picked = []
        for run, select in ((run_first, select_first), (run_second, select_second)):
            traced = trace(variant.model, run)
            picked.append(None if traced is None else {p: select(x) for p, x in traced.items()})
        plain, gold = _unit_traces(reference, golden, batch, ids, mask)
    except Exception as exc:
        return _failed(exc)
    return between(picked[0], picked[1], plain, gold, dtype, exact)
