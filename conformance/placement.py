"""Where a model's weights live: device maps, offload hooks, per-device sizes (C12, C14).

Sharding and offloading may change *where* weights live and nothing else. These helpers say
where each tensor should be (``hf_device_map``), where it is (its device, or the accelerate
hook that serves it when it is offloaded), how many bytes a map puts on each device, and
whether two outputs are bitwise equal. Used by the offload, planning and sharding checks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

from conformance.compat import dtype_kwarg, parse_dtype
from conformance.running import Loaded, LoadError, model_inputs, speech_inputs
from conformance.strategies import BatchSpec
from conformance.variants import Variant
from conformance.zoo import ZooModel, auto_class, speech_encoder

OFFLOADED = ("cpu", "disk")  # map values that are not an accelerator index


def device_key(value: Any) -> str:
    """One spelling per device: 0 / "cuda:0" / torch.device("cuda", 0) -> "cuda:0"."""
    if isinstance(value, int):
        return f"cuda:{value}"
    text = str(value)
    return "cuda:0" if text == "cuda" else text


def resolve(device_map: dict[str, Any], name: str) -> Any:
    """The map entry that places tensor `name`: the longest key that is `name` or a prefix of it."""
    best, found = -1, None
    for key, device in device_map.items():
        if (key == "" or name == key or name.startswith(key + ".")) and len(key) > best:
            best, found = len(key), device
    return found


def no_split_classes(model: Any) -> list[str]:
    return sorted(getattr(model, "_no_split_modules", None) or [])


def named_tensors(model: Any) -> Iterator[tuple[str, Any]]:
    """Every parameter and buffer under every name it has (tied tensors appear once per name)."""
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def nbytes(tensor: Any, dtype: Any = None) -> int:
    """Real bytes of a tensor (a bool is one byte); a floating one at `dtype` when one is given
    (the dtype it will be loaded in)."""
    if dtype is not None and tensor.is_floating_point():
        return tensor.numel() * parse_dtype(dtype).itemsize if isinstance(dtype, str) \
            else tensor.numel() * dtype.itemsize
    return tensor.numel() * tensor.element_size()


def model_bytes(model: Any, dtype: Any = None) -> int:
    """Total bytes of the unique tensors (a tied weight counts once)."""
    seen: dict[int, int] = {}
    for _, tensor in named_tensors(model):
        seen[id(tensor)] = nbytes(tensor, dtype)
    return sum(seen.values())


def units(model: Any) -> list[str]:
    """Disjoint submodule names covering every tensor, in module order, no-split modules whole:
    the granularity of an explicit device map (embeddings, each layer, final norm, head).

    A module holding tensors of its own beside children (BART's ``final_logits_bias`` on the
    model itself) contributes each such tensor by name, as accelerate's own maps do, so that the
    model is not one unit that no map can split."""
    keep_whole = set(no_split_classes(model))
    out: list[str] = []

    def walk(prefix: str, module: Any) -> None:
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        children = list(module.named_children())
        if type(module).__name__ in keep_whole or not children:
            if own or any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
                out.append(prefix)
            return
        out.extend(f"{prefix}.{name}" if prefix else name for name, _ in own)
        for name, child in children:
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    return out


def unit_bytes(model: Any, names: list[str], dtype: Any = None) -> dict[str, int]:
    sizes = dict.fromkeys(names, 0)
    seen: set[int] = set()
    for name, tensor in named_tensors(model):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        unit = resolve(dict(zip(names, names)), name)
        if unit is not None:
            sizes[unit] += nbytes(tensor, dtype)
    return sizes


def tied_groups(model: Any) -> list[list[str]]:
    """Names that share one tensor (an output head tied to the input embedding)."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def plan_bytes(model: Any, device_map: dict[str, Any], dtype: Any = None) -> dict[str, int]:
    """Bytes a device map puts on each device, each unique tensor counted once per device."""
    per_device: dict[str, dict[int, int]] = {}
    for name, tensor in named_tensors(model):
        device = resolve(device_map, name)
        if device is not None:
            per_device.setdefault(device_key(device), {})[id(tensor)] = nbytes(tensor, dtype)
    return {device: sum(sizes.values()) for device, sizes in per_device.items()}


def plan_problems(model: Any, device_map: dict[str, Any], caps: dict[str, int],
                  dtype: Any = None) -> tuple[list[str], dict[str, Any]]:
    """What is wrong with a device map: tensors it leaves out, caps it exceeds, no-split modules
    it cuts, tied tensors it separates. `caps` maps device keys ("cuda:0", "cpu") to bytes.

    Bytes are real bytes (a bool is one byte); where a cap is exceeded the message also gives
    what accelerate's own size estimate counted for that device."""
    from accelerate.utils import compute_module_sizes

    problems = []
    unplaced = [name for name, _ in named_tensors(model) if resolve(device_map, name) is None]
    if unplaced:
        problems.append(f"{len(unplaced)} tensors have no device in the map, first {unplaced[0]}")
    used = plan_bytes(model, device_map, dtype)
    estimated: dict[str, int] = {}
    for key, size in compute_module_sizes(model, dtype=dtype).items():
        if key in device_map:
            device = device_key(device_map[key])
            estimated[device] = estimated.get(device, 0) + int(size)
    for device, cap in caps.items():
        if used.get(device, 0) > cap:
            problems.append(f"{device} holds {used[device]} bytes > its cap {cap} (accelerate "
                            f"estimated {estimated.get(device, 0)} for what it put there)")
    keep_whole = set(no_split_classes(model))
    for prefix, module in model.named_modules():
        if type(module).__name__ not in keep_whole:
            continue
        devices = {device_key(resolve(device_map, f"{prefix}.{name}")) for name, _ in named_tensors(module)}
        if len(devices) > 1:
            problems.append(f"no-split module {prefix} ({type(module).__name__}) is split over "
                            f"{sorted(devices)}")
    for group in tied_groups(model):
        devices = {device_key(resolve(device_map, name)) for name in group}
        if len(devices) > 1:
            problems.append(f"tied tensors {group} are separated over {sorted(devices)}")
    figures = {"planned_bytes": used, "caps": caps, "devices_used": sorted(used),
               "model_bytes": model_bytes(model, dtype)}
    return problems, figures


# ---- where tensors actually are ---------------------------------------------------------------


def _hooks(module: Any) -> list[Any]:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", [hook]))


def offload_source(model: Any, name: str) -> tuple[str, Any] | None:
    """(storage, tensor) an accelerate offload hook serves for tensor `name`, or None.

    storage is "disk" (memory-mapped from a file: the checkpoint's safetensors or the
    offload_folder) or "ram" (a CPU state dict); the tensor is what the hook will load.
    """
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        prefix, local = ".".join(parts[:cut]), ".".join(parts[cut:])
        try:
            module = model.get_submodule(prefix)
        except AttributeError:
            continue
        for hook in _hooks(module):
            weights = getattr(hook, "weights_map", None)
            if not getattr(hook, "offload", False) or weights is None:
                continue
            try:
                value = weights[local]
            except KeyError:
                continue
            dataset, key = weights, local
            if isinstance(weights, PrefixedDataset):
                dataset, key = weights.dataset, weights.prefix + local
            storage = "ram"
            if isinstance(dataset, OffloadedWeightsLoader) and key not in dataset.state_dict:
                storage = "disk"
            return storage, value
    return None


def placement_problems(model: Any, main_device: str, reference: dict[str, Any] | None = None,
                       tied: list[list[str]] | None = None) -> tuple[list[str], dict[str, Any]]:
    """Every parameter is where ``hf_device_map`` says, and an offloaded one is served from the
    storage the map names, with the in-memory model's values (`reference`: name -> tensor).

    On an accelerator index the parameter lives on that GPU. "cpu" is resident on the CPU when
    the model runs on the CPU, else offloaded to a CPU state dict. "disk" is on the meta device,
    served from a file by its hook. A tied parameter may be served through its partner (`tied`:
    the in-memory model's tied groups), as accelerate does when the checkpoint stores it once.
    """
    import torch

    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return ["the model has no hf_device_map: it was not dispatched"], {}
    problems: list[str] = []
    counts: dict[str, int] = {}
    main = device_key(main_device)
    for name, param in model.named_parameters(remove_duplicate=False):
        expected = resolve(device_map, name)
        if expected is None:
            problems.append(f"{name} has no entry in hf_device_map")
            continue
        want, actual = device_key(expected), device_key(param.device)
        where = f"hf_device_map puts {name} on {want}"
        if want not in OFFLOADED or (want == "cpu" and main == "cpu"):
            if actual != want:
                problems.append(f"{name} is on {actual}, but {where}")
            counts[actual] = counts.get(actual, 0) + 1
            continue
        if actual == "cpu" and want == "cpu":  # a CPU-resident module beside a GPU main device
            counts["cpu"] = counts.get("cpu", 0) + 1
            continue
        if actual != "meta":
            problems.append(f"{name} is resident on {actual}, but {where} (offloaded)")
            continue
        source = offload_source(model, name)
        partners = next((g for g in tied or [] if name in g), [])
        for partner in partners:
            if source is None and partner != name and resolve(device_map, partner) == expected:
                source = offload_source(model, partner)
        storage_wanted = "disk" if want == "disk" else "ram"
        if source is None:
            problems.append(f"{name} is on meta and no offload hook serves it ({where})")
            continue
        storage, value = source
        counts[f"offloaded_{storage}"] = counts.get(f"offloaded_{storage}", 0) + 1
        if storage != storage_wanted:
            problems.append(f"{name} is offloaded to {storage}, but {where}")
        if tuple(value.shape) != tuple(param.shape):
            problems.append(f"offloaded {name} has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(param.shape)}")
        elif reference is not None and name in reference:
            ref = reference[name]
            served = value.to(device="cpu", dtype=ref.dtype)
            if not torch.equal(served, ref.to("cpu")):
                diff = float((served.double() - ref.to("cpu").double()).abs().max())
                problems.append(f"offloaded {name} differs from the in-memory model's weights "
                                f"(max |diff| = {diff:.3g})")
    figures = {"device_map": {k: device_key(v) for k, v in device_map.items()},
               "parameters_by_placement": counts}
    return problems, figures


def accelerate_sizes(model: Any, names: list[str], dtype: Any = None) -> tuple[int, int]:
    """(whole model, largest of `names`) in bytes as accelerate's planner counts them."""
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(model, dtype=dtype)
    return int(sizes[""]), int(max(sizes.get(name, 0) for name in names))


def reference_weights(model: Any) -> dict[str, Any]:
    """The in-memory model's parameters by every name (tied names included), for comparison."""
    return {name: param.detach() for name, param in model.named_parameters(remove_duplicate=False)}


def resident_bytes(model: Any, device: str, parameters: bool = True) -> int:
    """Bytes of unique tensors that really live on `device` (offloaded ones are on meta);
    buffers only, with parameters=False."""
    seen: dict[int, int] = {}
    tensors = named_tensors(model) if parameters else model.named_buffers(remove_duplicate=False)
    for _, tensor in tensors:
        if device_key(tensor.device) == device_key(device):
            seen[tensor.untyped_storage().data_ptr() or id(tensor)] = nbytes(tensor)
    return sum(seen.values())


class MetaGuard(TorchDispatchMode):
    """Records every op that mixes meta tensors with real ones during a forward.

    An offload hook that skips a layer leaves its weights on the meta device, and torch then
    computes with them silently (``linear(cpu_input, meta_weight)`` returns a CPU tensor).
    """

    def __init__(self) -> None:
        super().__init__()
        self.mixed: dict[str, list[tuple[int, ...]]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        import torch
        from torch.utils._pytree import tree_leaves

        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        meta = [t for t in tensors if t.device.type == "meta"]
        if meta and len(meta) < len(tensors):
            self.mixed.setdefault(str(func), []).append(tuple(meta[0].shape))
        return func(*args, **kwargs)

    def verdict(self) -> str | None:
        if not self.mixed:
            return None
        op, shapes = next(iter(self.mixed.items()))
        total = sum(len(v) for v in self.mixed.values())
        return (f"{total} ops computed with meta tensors (first: {op} on a meta tensor of shape "
                f"{list(shapes[0])}): an offloaded layer's weights were never loaded")


# ---- comparing a placed model with the in-memory one ---------------------------------------

FORWARD_BATCH = BatchSpec((12, 7), "right", seed=7)
GENERATE_BATCH = BatchSpec((6, 6), "none", seed=11)
NEW_TOKENS = 6


def compare_placed(placed: Loaded, memory: Loaded, metrics: dict[str, Any],
                   reference: dict[str, Any] | None = None, tied: list[list[str]] | None = None,
                   close: Callable[[Any, Any], tuple[str | None, dict[str, Any]]] | None = None,
                   ) -> str | None:
    """The first way a placed model differs from the in-memory one, or None.

    Placement as mapped (offloaded weights equal to `reference`), no meta weight computed with,
    and logits and greedy tokens bitwise equal. `close` replaces bitwise equality of the logits
    where different kernels run (GPUs of different models); tokens must then agree up to the
    first step where the in-memory model's top-2 margin is within twice the logits' difference.
    """
    from conformance.running import forward

    problems, figures = placement_problems(placed.model, memory.device, reference, tied)
    metrics.update(figures)
    if problems:
        return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
    started = time.perf_counter()
    expected = forward(memory, FORWARD_BATCH)
    metrics["in_memory_forward_s"] = time.perf_counter() - started
    out, problem, metrics["placed_forward_s"] = run_guarded(placed, FORWARD_BATCH)
    if problem:
        return problem
    problem, figures = (close or (lambda a, b: bitwise(a, b, "outputs")))(out, expected)
    metrics.update(figures)
    if problem or memory.zoo.kind == "encoder":  # an encoder generates nothing
        return problem
    tokens, _ = greedy(placed, GENERATE_BATCH, NEW_TOKENS)
    expected_tokens, margins = greedy(memory, GENERATE_BATCH, NEW_TOKENS)
    if close is None:
        problem, figures = bitwise(tokens, expected_tokens, "greedy_tokens")
        metrics.update(figures)
        return problem
    slack = 2 * float((out - expected).abs().nan_to_num(0).max())
    for row, step in (tokens != expected_tokens).nonzero().tolist():
        if float(margins[row, step]) > slack:
            return (f"greedy token {step} of row {row} differs ({int(tokens[row, step])} vs "
                    f"{int(expected_tokens[row, step])}) where the in-memory model's top-2 margin "
                    f"{float(margins[row, step]):.3g} exceeds twice the logits' difference {slack:.3g}")
        break
    metrics["greedy_tokens_agreement"] = float((tokens == expected_tokens).double().mean())
    return None


# ---- loading and running placed models --------------------------------------------------------


def load_placed(zoo_model: ZooModel, variant: Variant, dtype: str, source: str, device: str,
                **placement: Any) -> tuple[Loaded, float]:
    """``from_pretrained`` with the variant's kwargs plus device_map / max_memory / offload_folder;
    (loaded, seconds). Any failure is a one-line LoadError naming model, variant and cause."""
    import torch

    torch_dtype = parse_dtype(dtype)
    started = time.perf_counter()
    default_dtype = torch.get_default_dtype()
    try:
        kwargs = {**dtype_kwarg(torch_dtype), **variant.load_kwargs(torch_dtype), **placement}
        model = auto_class(zoo_model.kind).from_pretrained(source, **kwargs)
        model.eval()
        if variant.post_load is not None:
            model = variant.post_load(model)
    except Exception as exc:
        # transformers 4.48 sets torch's default dtype for the load and, when the load raises,
        # leaves it set: every model built afterwards in this process would get that dtype
        torch.set_default_dtype(default_dtype)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        refused = any(marker in str(exc) for marker in variant.refusals)
        raise LoadError(
            f"{variant.id} {'refuses' if refused else 'failed'} {zoo_model.name} in {dtype} with "
            f"{_describe(placement)}: {type(exc).__name__}: {first[:300]}",
            refused=refused,
        ) from exc
    return Loaded(model, zoo_model, variant, dtype, device), time.perf_counter() - started


def _describe(placement: dict[str, Any]) -> str:
    device_map = placement.get("device_map")
    text = f"device_map={device_map!r}" if isinstance(device_map, str) else \
        f"device_map over {sorted({device_key(v) for v in (device_map or {}).values()})}"
    if placement.get("max_memory"):
        text += f", max_memory={placement['max_memory']}"
    return text + (", offload_folder" if placement.get("offload_folder") else ", no offload_folder")


def bin_checkpoint(model: Any, out: Path) -> str:
    """The model saved as a pickled ``pytorch_model.bin`` (not safetensors): accelerate cannot
    memory-map such weights, so disk offload has to re-save them into an offload_folder."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    torch.save({k: v.detach().to("cpu") for k, v in model.state_dict().items()},
               out / "pytorch_model.bin")
    return str(out)


def run_guarded(loaded: Loaded, batch: BatchSpec) -> tuple[Any, str | None, float]:
    """Forward as every check runs it, watching for meta tensors; (outputs, problem, seconds).

    A forward that raises is reported in one line, not a traceback."""
    from conformance.running import forward

    guard = MetaGuard()
    started = time.perf_counter()
    try:
        with guard:
            out = forward(loaded, batch)
    except Exception as exc:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), "").strip()
        return None, (f"forward of the placed model failed: {type(exc).__name__}: "
                      f"{first[:200]}"), time.perf_counter() - started
    return out, guard.verdict(), time.perf_counter() - started


def greedy(loaded: Loaded, batch: BatchSpec, new_tokens: int) -> tuple[Any, Any]:
    """Greedy continuation of `batch` (exactly `new_tokens` tokens) as CPU token ids, and the
    top-1 minus top-2 score at each step (how decisive each choice was)."""
    import torch

    inputs = generate_inputs(loaded, batch)
    with torch.inference_mode(), loaded.variant.context():
        out = loaded.model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, pad_token_id=loaded.pad_id,
                                    output_scores=True, return_dict_in_generate=True)
    # a decoder's sequences carry the prompt; an encoder-decoder's start with the decoder start token
    start = 1 if loaded.zoo.kind == "seq2seq" else inputs["input_ids"].shape[1]
    tokens = out.sequences[:, start:].to("cpu")
    scores = torch.stack([s.float().to("cpu") for s in out.scores], dim=1)
    top = scores.topk(2, dim=-1).values
    return tokens, top[..., 0] - top[..., 1]


def generate_inputs(loaded: Loaded, batch: BatchSpec) -> dict[str, Any]:
    """`generate`'s prompt for `batch`: ids and mask (a decoder's positions are generate's own);
    a speech encoder-decoder's encoder features alone, its decoder starting from the start token."""
    inputs = model_inputs(loaded, batch)
    inputs.pop("position_ids", None)
    if speech_encoder(loaded.model.config):
        inputs = {"input_features": speech_inputs(loaded, inputs)["input_features"]}
    return inputs


def bitwise(placed: Any, memory: Any, what: str) -> tuple[str | None, dict[str, Any]]:
    """Placed and in-memory outputs must be identical (NaN where the other is NaN)."""
    import torch

    if placed.shape != memory.shape:
        return f"{what}: shape {tuple(placed.shape)} != in-memory {tuple(memory.shape)}", {}
    same = (placed == memory) | (torch.isnan(placed) & torch.isnan(memory))
    if placed.is_floating_point():
        diff = (placed - memory).abs().nan_to_num(nan=float("inf"))
        worst = float(diff.masked_fill(same, 0).max()) if diff.numel() else 0.0
    else:
        worst = float((~same).sum())
    figures = {f"{what}_max_abs_diff": worst, f"{what}_differing": int((~same).sum())}
    if bool(same.all()):
        return None, figures
    index = int((~same).flatten().nonzero()[0])
    pos = [int(i) for i in torch.unravel_index(torch.tensor(index), same.shape)]
    return (f"{what} differ from the in-memory model: {int((~same).sum())} of {same.numel()} "
            f"values, max |diff| = {worst:.3g}, first at index {pos}"), figures


def free_accelerator_memory() -> None:
    """Return a dropped placed model's GPU memory before the next check measures its own."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gpu_allocated() -> dict[str, int]:
    """torch.cuda.memory_allocated per visible GPU ({} without one)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": int(torch.cuda.memory_allocated(i)) for i in range(torch.cuda.device_count())}
