"""What the run is on: device, its capability, and the library versions that decide which variants run."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from conformance.compat import installed_version

REPORTED_PACKAGES = (
    "torch",
    "transformers",
    "optimum",
    "optimum-onnx",
    "accelerate",
    "bitsandbytes",
    "flash-attn",
    "flash-attn-4",
    "nvidia-cutlass-dsl",
    "safetensors",
    "hypothesis",
)


@dataclass(frozen=True)
class Environment:
    device: str  # "cpu", "cuda:0"
    kind: str  # "cpu" or "cuda"
    name: str
    capability: tuple[int, int] | None = None
    driver: str | None = None
    versions: dict[str, str | None] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "device_kind": self.kind,
            "device_name": self.name,
            "compute_capability": ".".join(map(str, self.capability)) if self.capability else None,
            "driver": self.driver,
            "versions": self.versions,
        }


def package_versions() -> dict[str, str | None]:
    return {name: (str(v) if (v := installed_version(name)) else None) for name in REPORTED_PACKAGES}


# Collection-only dry runs (`gpu/run --plan`): plan a GPU run on a machine without one. The value
# names the device as "NAME@MAJOR.MINOR" (e.g. "NVIDIA H200@9.0"); the plugin refuses to run tests
# under it, so no result can come from a device that is not there.
PLAN_DEVICE = "CONFORMANCE_PLAN_DEVICE"


def planned_device() -> Environment | None:
    """The device a dry run plans for (PLAN_DEVICE), or None in a real run."""
    spec = os.environ.get(PLAN_DEVICE)
    if not spec:
        return None
    name, _, cc = spec.rpartition("@")
    major, _, minor = cc.partition(".")
    if not (name and major.isdigit() and minor.isdigit()):
        raise ValueError(f"{PLAN_DEVICE}={spec!r}: expected NAME@MAJOR.MINOR, e.g. 'NVIDIA H200@9.0'")
    return Environment(device="cuda:0", kind="cuda", name=f"{name} (planned: collection only)",
                       capability=(int(major), int(minor)), versions=package_versions())


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def validate_device(device: str) -> str | None:
    """An error line for a device the run cannot use, else None."""
    import torch

    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        return f"--device {device!r}: expected cpu, cuda or cuda:N"
    if kind == "cuda" and os.environ.get(PLAN_DEVICE):
        return None
    if kind == "cuda":
        if not torch.cuda.is_available():
            return f"--device {device}: no CUDA device is visible to torch {torch.__version__}"
        if index and int(index) >= torch.cuda.device_count():
            return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible"
    return None


@cache
def probe(device: str) -> Environment:
    import torch

    kind = device.partition(":")[0]
    if kind == "cuda" and (planned := planned_device()) is not None:
        return planned
    versions = package_versions()
    if kind == "cuda":
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        return Environment(
            device=f"cuda:{index}",
            kind="cuda",
            name=props.name,
            capability=(props.major, props.minor),
            driver=_nvidia_driver(),
            versions=versions | {"cuda": torch.version.cuda},
        )
    import platform

    return Environment(device="cpu", kind="cpu", name=platform.processor() or platform.machine(),
                       versions=versions)


def _nvidia_driver() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (subprocess.SubprocessError, OSError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
