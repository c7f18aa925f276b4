"""The routing near-tie rule and the router-aware proof (conformance/routing.py, probes.py)."""

from __future__ import annotations

import pytest
import torch

from conformance import probes, routing


def test_a_row_is_judged_up_to_its_first_near_tie() -> None:
    tie = routing.tie_margin("fp32")
    margins = torch.tensor([[0.5, 0.4, tie / 2, 0.5, 0.5],
                            [0.5, 0.5, 0.5, 0.5, float("nan")]], dtype=torch.float64)
    real = torch.tensor([[True] * 5, [True] * 4 + [False]])
    found = routing.decided(margins, real, "fp32")
    assert found.tolist() == [[True, True, False, False, False], [True, True, True, True, False]]


def test_the_rule_is_per_dtype() -> None:
    """A margin that is a tie for bf16's rounding is decided for fp32's."""
    margin = routing.tie_margin("bf16") / 2
    assert margin > routing.tie_margin("fp32")
    margins = torch.full((1, 3), margin, dtype=torch.float64)
    real = torch.ones(1, 3, dtype=torch.bool)
    assert routing.decided(margins, real, "fp32").all()
    assert not routing.decided(margins, real, "bf16").any()


def test_a_quantized_path_has_its_schemes_ties() -> None:
    """int8 moves the router logits by its own error: a margin decided for fp32's rounding is a tie
    for it (tolerances.ROUTING_TIE_QUANT); a scheme without a margin keeps the dtype's rule."""
    margin = routing.tie_margin("fp32", "int8") / 2
    assert margin > routing.tie_margin("fp32")
    margins = torch.full((1, 3), margin, dtype=torch.float64)
    real = torch.ones(1, 3, dtype=torch.bool)
    assert routing.decided(margins, real, "fp32").all()
    assert not routing.decided(margins, real, "fp32", "int8").any()
    assert routing.tie_margin("fp32", "nf4") == routing.tie_margin("fp32")


def test_dense_models_have_no_routing() -> None:
    class Config:
        num_hidden_layers = 2

    class Dense(torch.nn.Module):
        config = Config()

    assert routing.experts_per_token(Dense()) is None


class ToySparseMoeBlock(torch.nn.Module):
    """Named like transformers' blocks: its softmax is routing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)


class ToyAttention(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)


class ToyConfig:
    num_experts_per_tok, num_local_experts = 2, 4


class Toy(torch.nn.Module):
    config = ToyConfig()

    def __init__(self) -> None:
        super().__init__()
        self.attention, self.block = ToyAttention(), ToySparseMoeBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.attention(x))


@pytest.mark.parametrize("inference", [False, True])
def test_a_routers_softmax_is_not_read_as_the_plain_attention_path(inference: bool) -> None:
    """An SDPA proof forbids the plain path's softmax: the attention's still counts as that, the
    router's is counted apart (routing::...)."""
    model, counter = Toy(), probes.OpCounter()
    grad = torch.inference_mode() if inference else torch.no_grad()
    with grad, probes.routing_watched(counter, model), counter:
        model(torch.randn(2, 4))
    plain = counter.matching(("aten::_softmax", "aten::_safe_softmax"))
    routed = counter.matching(("routing::*",))
    assert sum(plain.values()) == 1, counter.counts
    assert sum(routed.values()) >= 1, counter.counts
    assert counter.routing == 0
