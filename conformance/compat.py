"""Guards for APIs that exist only at one end of the supported version range.

The suite runs against transformers 4.36 .. 5.x, optimum 1.14 .. 2.x and torch 2.1 onwards;
every spelling that changed in that range is resolved here and nowhere else.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from collections.abc import Iterator
from functools import cache
from typing import Any

from packaging.version import Version


@cache
def installed_version(distribution: str) -> Version | None:
    """Version of an installed distribution, or None; never imports the package."""
    try:
        return Version(importlib.metadata.version(distribution))
    except importlib.metadata.PackageNotFoundError:
        return None
    except ValueError:  # an unparsable local version string
        return None


def transformers_at_least(version: str) -> bool:
    found = installed_version("transformers")
    return found is not None and found.release >= Version(version).release


def dtype_kwarg(dtype: Any) -> dict[str, Any]:
    """``from_pretrained`` spells the weight dtype ``dtype`` since 4.56, ``torch_dtype`` before."""
    return {"dtype": dtype} if transformers_at_least("4.56") else {"torch_dtype": dtype}


_ENUM_NAMES = {
    "math": "MATH",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
}


@contextlib.contextmanager
def force_sdpa_backend(backend: str) -> Iterator[None]:
    """Allow exactly one SDPA backend: torch.nn.attention.sdpa_kernel, or the old flags before 2.3."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        with legacy_sdp_kernel(backend):
            yield
        return
    with sdpa_kernel(getattr(SDPBackend, _ENUM_NAMES[backend])):
        yield


@contextlib.contextmanager
def legacy_sdp_kernel(backend: str) -> Iterator[None]:
    """The guides' 2023 spelling, ``torch.backends.cuda.sdp_kernel(enable_flash=...)``."""
    import warnings

    import torch

    flags = {
        "enable_flash": backend == "flash",
        "enable_math": backend == "math",
        "enable_mem_efficient": backend == "efficient",
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ctx = torch.backends.cuda.sdp_kernel(**flags)
    with ctx:
        yield


def has_legacy_sdp_kernel() -> bool:
    import torch

    return hasattr(torch.backends.cuda, "sdp_kernel")


DTYPE_NAMES = ("fp32", "bf16", "fp16")


def dtype_table() -> dict[str, Any]:
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def short_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bf16"``: parse_dtype's inverse."""
    return next(name for name, value in dtype_table().items() if value == dtype)


def parse_dtype(name: str) -> Any:
    """``"bf16"`` -> ``torch.bfloat16``; the short names are the ones test ids use."""
    table = dtype_table()
    if name not in table:
        raise KeyError(f"unknown dtype {name!r}; known: {', '.join(table)}")
    return table[name]


@cache
def eager_experts() -> dict[str, Any]:
    """Load kwargs for the golden run's mixture-of-experts layers: eager expert loops where the
    config knows an experts implementation (transformers 5.x, whose default grouped_mm kernel
    refuses float64: "Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double");
    nothing elsewhere (a no-op for dense models)."""
    from transformers import PretrainedConfig

    return {"experts_implementation": "eager"} if hasattr(PretrainedConfig, "_experts_implementation") else {}


@cache
def distributed_config_missing(*names: str) -> str | None:
    """Why ``transformers.distributed.DistributedConfig`` cannot take these sizes, or None.
    transformers 5.1 .. 5.11 ship the class with only ``enable_expert_parallel`` (tp_size is there
    by 5.13, pp_size by 5.16, ep_size by 5.19): a tp/pp/ep variant there has no config to load under."""
    import dataclasses

    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return "needs transformers.distributed.DistributedConfig (not in this transformers)"
    fields = {f.name for f in dataclasses.fields(DistributedConfig)} \
        if dataclasses.is_dataclass(DistributedConfig) else set()
    if not fields:  # not a dataclass: its constructor's names say what it takes
        import inspect

        fields = set(inspect.signature(DistributedConfig.__init__).parameters) - {"self"}
    lacking = [n for n in names if n not in fields]
    if not lacking:
        return None
    return (f"needs DistributedConfig({', '.join(f'{n}=...' for n in lacking)}); this transformers' "
            f"DistributedConfig takes {', '.join(sorted(fields)) or 'nothing'}")
