"""What a variant needs to run, and the skip reason that says what is missing and where it runs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from packaging.specifiers import SpecifierSet

from conformance.compat import installed_version
from conformance.environment import Environment

LEGACY_STACK = "the legacy stack (transformers 4.48.x + optimum 1.27: `nox -s legacy`)"
CURRENT_STACK = "the current stack (`nox -s current`)"
GPU_RUNNER = "a CUDA GPU runner (`--device cuda`)"


@dataclass(frozen=True)
class Needs:
    """Declarative requirements; `unmet` turns them into one human reason."""

    packages: Mapping[str, str] = field(default_factory=dict)  # distribution -> specifier
    # extra package needs on one device kind, e.g. bitsandbytes on CPU needs a newer transformers
    packages_on: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    min_capability: tuple[int, int] | None = None
    # allowed dtypes per device kind; a kind missing here allows every dtype
    dtypes: Mapping[str, frozenset[str]] = field(default_factory=dict)
    where: str = ""  # where the variant does run, for the skip reason
    predicate: tuple[str, ...] = ()  # names of extra checks in PREDICATES
    # why only `dtypes` run (replaces `where` in a dtype skip: another stack would not help)
    dtype_note: str = ""

    def unmet(self, env: Environment, dtype: str | None = None) -> str | None:
        """None when the variant can run here, else a reason naming what is missing."""
        missing = missing_packages(self.packages)
        if not missing:  # device-specific needs, said as such (bitsandbytes on CPU needs ...)
            missing = missing_packages(self.packages_on.get(env.kind, {}), f" on {env.kind}")
        if missing:
            return self._reason("needs " + " and ".join(missing))
        if env.kind not in self.devices:
            wanted = " or ".join(sorted(self.devices))
            return self._reason(f"needs a {wanted} device (this run: {env.kind})", GPU_RUNNER)
        if self.min_capability and (env.capability or (0, 0)) < self.min_capability:
            cc = ".".join(map(str, self.min_capability))
            return self._reason(f"needs compute capability >= {cc} (this device: {env.capability})")
        allowed = self.dtypes.get(env.kind)
        if dtype is not None and allowed is not None and dtype not in allowed:
            what = f"supports {'/'.join(sorted(allowed))} on {env.kind}, not {dtype}"
            return f"{what}: {self.dtype_note}" if self.dtype_note else self._reason(what)
        for name in self.predicate:
            reason = PREDICATES[name]()
            if reason:
                return self._reason(reason)
        return None

    def _reason(self, what: str, default_where: str = "") -> str:
        where = self.where or default_where
        return f"{what}: run on {where}" if where else what


def missing_packages(packages: Mapping[str, str], where: str = "") -> list[str]:
    out = []
    for dist, spec in packages.items():
        found = installed_version(dist)
        if found is None:
            out.append(f"{dist}{spec}{where} (not installed)")
        elif spec and not SpecifierSet(spec, prereleases=True).contains(found):
            out.append(f"{dist}{spec}{where} (installed: {found})")
    return out


def _legacy_sdp_kernel_missing() -> str | None:
    from conformance.compat import has_legacy_sdp_kernel

    return None if has_legacy_sdp_kernel() else "needs torch.backends.cuda.sdp_kernel (removed)"


def _flash_attn_importable() -> str | None:
    try:
        import flash_attn  # noqa: F401
    except Exception as exc:  # an installed flash-attn built for another torch fails here
        return f"flash-attn does not import ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    return None


def _flash_attn_4_importable() -> str | None:
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as exc:  # the CuTe DSL's native libraries missing or built for another CUDA
        return f"flash_attn.cute does not import ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    return None


def _optimum_onnxruntime_missing() -> str | None:
    from conformance.paths.onnx_runtime import optimum_ort_missing

    return optimum_ort_missing()


def _ort_provider(provider: str) -> Callable[[], str | None]:
    def missing() -> str | None:
        from conformance.paths.onnx_runtime import provider_missing

        return provider_missing(provider)

    return missing


def _compile_opted_in() -> str | None:
    from conformance.paths.compiled import opt_in_missing

    return opt_in_missing()


def _cxx_compiler() -> str | None:
    from conformance.paths.compiled import cxx_compiler_missing

    return cxx_compiler_missing()


def _distributed_config(*names: str) -> Callable[[], str | None]:
    def missing() -> str | None:
        from conformance.compat import distributed_config_missing

        return distributed_config_missing(*names)

    return missing


PREDICATES = {
    "legacy_sdp_kernel": _legacy_sdp_kernel_missing,
    "flash_attn_importable": _flash_attn_importable,
    "flash_attn_4_importable": _flash_attn_4_importable,
    "optimum_onnxruntime": _optimum_onnxruntime_missing,
    "ort_cuda_provider": _ort_provider("CUDAExecutionProvider"),
    "ort_tensorrt_provider": _ort_provider("TensorrtExecutionProvider"),
    "compile_opted_in": _compile_opted_in,
    "cxx_compiler": _cxx_compiler,
    # DistributedConfig's sizes per mode (variants.DISTRIBUTED_VARIANTS)
    "distributed_tp": _distributed_config("tp_size"),
    "distributed_ep": _distributed_config("tp_size", "ep_size"),
    "distributed_pp": _distributed_config("pp_size"),
}
