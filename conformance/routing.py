"""The routing near-tie rule: which positions of a mixture of experts' batch can be judged.

A router picks its top-k experts per token. Where the golden run's k-th and (k+1)-th router
logits are closer than the rounding error a same-dtype path makes in them, float64 and the
dtype judged may pick different experts, and both are right: the token then goes through other
weights, and every later position of its row sees that through attention. So a row is judged up
to its first near tie (in any layer) and not beyond; that is the generation near-tie rule applied
to routing. The margins come from the golden run (eager in float64, each row alone), never from
the path under test, so a path that routes wrongly cannot widen its own exemption: a real tie is
a property of the sequence, not of the variant.

Dense models are all decided: `judged` is then the batch's real-token mask, at no cost.
"""

from __future__ import annotations

from typing import Any

from conformance import tolerances
from conformance.compare import eps
from conformance.strategies import BatchSpec


def experts_per_token(model: Any) -> int | None:
    """k of a mixture of experts' top-k routing; None for a dense model."""
    return routed_k(getattr(model, "config", None))


def routed_k(config: Any) -> int | None:
    """`experts_per_token` from a config object, or a config.json's dict."""
    field = config.get if isinstance(config, dict) else lambda name: getattr(config, name, None)
    k = field("num_experts_per_tok")
    experts = field("num_local_experts") or field("num_experts")
    return int(k) if k and experts and int(experts) > int(k) else None


def experts_fused(model: Any) -> bool:
    """A mixture of experts whose experts are held as one (experts, out, in) tensor per layer, as
    transformers 5.x converts them at load (4.x keeps one nn.Linear per expert)."""
    return experts_per_token(model) is not None and any(p.dim() == 3 for p in model.parameters())


def margins_per_row(golden: Any, batch: BatchSpec) -> Any:
    """(rows, width) float64: at each real position the smallest top-k margin over the layers,
    (k-th - (k+1)-th router logit) / max|router logit| of that row and layer; NaN at padding."""
    import torch

    from conformance.running import call_model, plain_inputs

    k = experts_per_token(golden.model)
    input_ids, mask = batch.materialize(golden.vocab_size, golden.pad_id)
    margins = torch.full(tuple(mask.shape), float("nan"), dtype=torch.float64)
    for row in range(len(batch.lengths)):
        real = mask[row].bool()
        ids = input_ids[row][real][None]
        inputs = plain_inputs(golden, ids, torch.ones_like(ids)) | {"output_router_logits": True}
        out = call_model(golden, inputs)
        smallest = None
        for logits in out.router_logits:
            logits = logits.detach().to("cpu", torch.float64).reshape(-1, logits.shape[-1])
            ranked = logits.sort(dim=-1, descending=True).values
            relative = (ranked[:, k - 1] - ranked[:, k]) / logits.abs().max().clamp(min=1e-300)
            smallest = relative if smallest is None else torch.minimum(smallest, relative)
        margins[row, real] = smallest
    return margins


def tie_margin(dtype: str, scheme: str = "") -> float:
    """The relative router-logit margin under which a position is a routing near tie:
    tolerances.ROUTING_TIE_ULPS x eps(dtype), or a quantization scheme's wider margin where it has
    one (tolerances.ROUTING_TIE_QUANT: its router logits move by its own error)."""
    return max(tolerances.routing_tie_ulps(dtype) * eps(dtype), tolerances.ROUTING_TIE_QUANT.get(scheme, 0.0))


def decided(margins: Any, real: Any, dtype: str, scheme: str = "") -> Any:
    """Real positions before their row's first near tie: margin < tie_margin(dtype, scheme)."""
    import torch

    tie = real & (margins < tie_margin(dtype, scheme))
    before_first_tie = torch.cumsum(tie.long(), dim=-1) == 0
    return real & before_first_tie


def judged(cache: Any, golden: Any, batch: BatchSpec, dtype: str,
           metrics: dict[str, Any] | None = None, scheme: str = "") -> Any:
    """The positions a check compares on `batch`: its real tokens, for a mixture of experts only
    those before the row's first routing near tie (counted in `metrics`); `scheme`: a quantized
    path judged against golden, whose near ties are its scheme's."""
    real = batch.mask().bool()
    if experts_per_token(golden.model) is None:
        return real
    found = decided(cache.routing_margins(golden, batch), real, dtype, scheme)
    if metrics is not None:
        metrics["routing_real"] = metrics.get("routing_real", 0) + int(real.sum())
        metrics["routing_set_aside"] = metrics.get("routing_set_aside", 0) + int((real & ~found).sum())
    return found


def skip_if_nothing_judged(metrics: dict[str, Any], dtype: str, model: str, scheme: str = "") -> None:
    """After a check's examples: when every real position was set aside, the check judged
    nothing and says so (a skip with the figures), rather than passing."""
    import pytest

    real, aside = metrics.get("routing_real", 0), metrics.get("routing_set_aside", 0)
    if real and aside == real:
        where = f"{scheme} quantization" if tolerances.ROUTING_TIE_QUANT.get(scheme) else "this dtype"
        pytest.skip(f"every one of the {real} real positions drawn on {model} in {dtype} follows a "
                    f"routing near tie (top-k router margin under {tie_margin(dtype, scheme):.3g} "
                    f"of max|router logit| in the golden run): the expert choice there is a coin "
                    f"toss under {where}, so nothing was judged (fp32 judges this model)")
