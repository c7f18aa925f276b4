"""`-p refusing`: SDPA stands in for a forced kernel that refuses some inputs with the kernels'
own words ("No available kernel"), the way CUDA's flash backend refuses a mask. Which inputs:
CONFORMANCE_TEST_REFUSE=masked (every call with a mask) or long (queries longer than 16 tokens)."""

from __future__ import annotations

import os
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    import torch

    real = torch.nn.functional.scaled_dot_product_attention
    which = os.environ.get("CONFORMANCE_TEST_REFUSE", "masked")

    def refusing(*args: Any, **kwargs: Any) -> Any:
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if (which == "masked" and mask is not None) or (which == "long" and args[0].shape[-2] > 16):
            raise RuntimeError("No available kernel. Aborting execution. (planted refusal)")
        return real(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = refusing
