"""How big a checkpoint is before it is loaded, and which golden run it can afford.

The golden run is eager attention in float64 on the CPU: 8 bytes a parameter, 56 GB for a 7B
checkpoint, beside the plain reference and the variant under test (float32: 4 bytes a parameter
each). It runs in float64 only when it fits in GOLDEN_FP64_SHARE of the memory available when the
model is first judged, which leaves the rest for those two; otherwise the golden run is eager
float32 on the run's device with TF32 and reduced-precision reductions off
(variants.GOLDEN_DEVICE), and every record names the golden it used (metrics "golden").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GOLDEN_FP64_SHARE = 0.5  # of available memory: golden 8 B + reference 4 B + variant 4 B a parameter
FP64_BYTES = 8
# A weights file that is not safetensors has no header to read: its parameters are counted as its
# bytes / 2 (16-bit storage), an upper bound whatever it stores, so the rule never underestimates.
UNREADABLE_BYTES_PER_PARAM = 2


@dataclass(frozen=True)
class GoldenChoice:
    fp64: bool  # eager float64 on the CPU, else eager float32 on the run's device
    why: str  # the sizes the choice was made from, in words


def parameter_count(directory: Path) -> int | None:
    """The parameters of a checkpoint directory: exact from safetensors headers (no tensor is
    read), else the upper bound of its other weight files; None when it holds none."""
    safetensors = sorted(directory.glob("*.safetensors"))
    if safetensors:
        from safetensors import safe_open

        total = 0
        for path in safetensors:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    numel = 1
                    for size in handle.get_slice(name).get_shape():
                        numel *= int(size)
                    total += numel
        return total
    others = [p for pattern in ("*.bin", "*.pt", "*.pth") for p in directory.glob(pattern)]
    if not others:
        return None
    return sum(p.stat().st_size for p in others) // UNREADABLE_BYTES_PER_PARAM


def available_memory() -> int:
    """Bytes the system can give without swapping (psutil, which accelerate already needs)."""
    import psutil

    return int(psutil.virtual_memory().available)


def golden_choice(parameters: int | None, available: int) -> GoldenChoice:
    """Float64 on the CPU when 8 bytes a parameter fit in GOLDEN_FP64_SHARE of `available`."""
    if parameters is None:
        return GoldenChoice(True, "no local weights to size: float64 assumed")
    need = FP64_BYTES * parameters
    allowed = GOLDEN_FP64_SHARE * available
    fits = need <= allowed
    verb = "fits in" if fits else "exceeds"
    return GoldenChoice(fits, f"{parameters / 1e6:.1f} M parameters: float64 needs {need / 2**30:.2f} GiB, "
                        f"which {verb} {GOLDEN_FP64_SHARE:g} x the {available / 2**30:.1f} GiB "
                        "available")
