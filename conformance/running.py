"""Loading a model as a variant, and running its forward the way every check does."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conformance.checkpoints import checkpoint_problem
from conformance.compat import dtype_kwarg, eager_experts, parse_dtype
from conformance.probes import OpCounter, routing_watched
from conformance.sharing import SharedVersions, changed
from conformance.sizing import GoldenChoice, available_memory, golden_choice, parameter_count
from conformance.strategies import BatchSpec
from conformance.timing import cache_load
from conformance.variants import Variant
from conformance.zoo import (
    ZooModel,
    auto_class,
    local_dir,
    materialize,
    speech_encoder,
    speech_encoder_positions,
)


class LoadError(Exception):
    """Loading failed; the message is one line naming model, variant and cause."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused  # the library's documented refusal: a skip, not a failure


@dataclass
class Loaded:
    model: Any
    zoo: ZooModel
    variant: Variant
    dtype: str
    device: str
    # built from the resident reference (conformance/sharing.py): its weights, their versions then
    shared: SharedVersions = ()
    accepts_position_ids: bool = field(init=False)
    # what its 4-bit layers' arithmetic keeps ("" without any), measured once (conformance/arithmetic.py)
    kept_precision: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        params = inspect.signature(self.model.forward).parameters
        self.accepts_position_ids = self.zoo.kind == "decoder" and "position_ids" in params

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    @property
    def pad_id(self) -> int:
        pad = getattr(self.model.config, "pad_token_id", None)
        return int(pad) if pad is not None else 0


def load(zoo_model: ZooModel, variant: Variant, dtype: str, device: str, workdir: Path) -> Loaded:
    """from_pretrained with the variant's kwargs, then its post-load step; errors become LoadError.
    Every load is counted and timed (conformance/timing.py), fresh copies a check needs too."""
    from conformance.timing import spend

    with spend("loading", loads=1):
        return _load(zoo_model, variant, dtype, device, workdir)


def _load(zoo_model: ZooModel, variant: Variant, dtype: str, device: str, workdir: Path) -> Loaded:

    torch_dtype = parse_dtype(dtype)
    try:
        source = materialize(zoo_model, workdir)
        kwargs = {**dtype_kwarg(torch_dtype), **variant.load_kwargs(torch_dtype)}
        if dtype == "fp64":  # 5.x's default experts kernel (grouped_mm) refuses float64
            kwargs = {**eager_experts(), **kwargs}
        if variant.place_with_device_map:
            kwargs.setdefault("device_map", {"": device})  # a round-trip may reload under another map
        if variant.loader is not None:  # a path with its own loading (an ONNX export): it places
            model = variant.loader(source, zoo_model.kind, torch_dtype, device, kwargs)
        else:
            model = auto_class(zoo_model.kind).from_pretrained(source, **kwargs)
            if not variant.place_with_device_map:
                model.to(device)
            model.eval()
        if variant.post_load is not None:
            model = variant.post_load(model)
    except Exception as exc:
        raise _load_error(zoo_model, variant, dtype, workdir, exc) from exc
    return Loaded(model, zoo_model, variant, dtype, device)


def _load_error(zoo_model: ZooModel, variant: Variant, dtype: str, workdir: Path,
                exc: Exception) -> LoadError:
    """One line naming model, variant and cause; the variant's documented refusals are a skip."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    refused = any(marker in str(exc) for marker in variant.refusals)
    verb = "refuses" if refused else "failed"
    detail = f"{type(exc).__name__}: {first[:300]}"
    if not refused:  # a damaged checkpoint is named as such, not by the library's symptom
        cause = checkpoint_problem(zoo_model, workdir)
        detail = f"{cause} ({type(exc).__name__})" if cause else detail
    return LoadError(f"{variant.id} {verb} {zoo_model.name} in {dtype}: {detail}", refused=refused)


def built_from(reference: Loaded, variant: Variant, workdir: Path) -> Loaded | None:
    """`variant` as a copy of the resident `reference` sharing its weights (conformance/sharing.py),
    or None where it needs its own load: its kwargs say more than an attention implementation, it
    has a post-load step or its own loader, or this transformers cannot switch the model."""
    from conformance import sharing
    from conformance.timing import count, spend

    if variant.reference or variant.post_load is not None or variant.loader is not None \
            or variant.place_with_device_map or variant.distributed is not None:
        return None
    implementation = sharing.attention_only(variant.load_kwargs(parse_dtype(reference.dtype)))
    if implementation is None:
        return None
    with spend("loading"):
        try:
            model = sharing.switched_copy(reference.model, implementation)
        except Exception as exc:
            raise _load_error(reference.zoo, variant, reference.dtype, workdir, exc) from exc
    if model is None:
        return None
    count(built=1)
    return Loaded(model, reference.zoo, variant, reference.dtype, reference.device, sharing.versions(model))


def model_inputs(loaded: Loaded, batch: BatchSpec) -> dict[str, Any]:
    """Tensors for one forward; decoders get position ids that skip left padding (as generate does)."""
    return plain_inputs(loaded, *batch.materialize(loaded.vocab_size, loaded.pad_id))


def plain_inputs(loaded: Loaded, input_ids: Any, mask: Any) -> dict[str, Any]:
    """The plain call's inputs: ids, mask and (where the model takes them) positions that skip
    left padding, on the model's device."""
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    if loaded.accepts_position_ids:
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return {k: v.to(loaded.device) for k, v in inputs.items()}


def call_model(loaded: Loaded, inputs: dict[str, Any], counter: OpCounter | None = None) -> Any:
    """The model's own output object for `inputs`, inside the variant's context (an option's
    extras, a traced forward)."""
    import contextlib

    import torch

    from conformance.timing import forward_phase

    if loaded.zoo.kind == "seq2seq":
        inputs = with_decoder_inputs(loaded, inputs)
    with forward_phase(loaded, counter is not None), torch.inference_mode(), loaded.variant.context(), \
            routing_watched(counter, loaded.model), counter or contextlib.nullcontext():
        out = loaded.model(**inputs)
    if loaded.shared and (written := changed(loaded.shared)) is not None:
        import pytest

        pytest.fail(f"{written}, a weight {loaded.variant.id} shares with the plain reference of "
                    f"{loaded.zoo.name}, was written in place since it was built (conformance/"
                    "sharing.py): the reference it is judged against has changed", pytrace=False)
    return out


# an encoder-decoder's decoder tokens at a position: a fixed map of the encoder token there
DECODER_TOKEN_STRIDE, DECODER_TOKEN_OFFSET = 7, 11


def with_decoder_inputs(loaded: Loaded, inputs: dict[str, Any]) -> dict[str, Any]:
    """An encoder-decoder's call: the encoder inputs as given, and decoder inputs of the same
    lengths, padding side and mask, their tokens a fixed map of the encoder's token at each
    position (a row's decoder tokens are the same alone and padded, so every check's batch, its
    mask and its real positions serve both sides). A speech encoder (Whisper) reads no tokens:
    the drawn tokens and mask are the decoder's, and the encoder gets log-mel features drawn from
    each row's real tokens (`speech_inputs`). Inputs that already carry decoder ids or embeddings,
    or are not token ids (a cache step), pass through."""
    if "decoder_input_ids" in inputs or "decoder_inputs_embeds" in inputs or "input_ids" not in inputs:
        return inputs
    if speech_encoder(loaded.model.config):
        return speech_inputs(loaded, inputs)
    mask = inputs.get("attention_mask")
    out = dict(inputs)
    if mask is not None:
        out["decoder_attention_mask"] = mask
    out["decoder_input_ids"] = decoder_tokens(loaded, inputs["input_ids"], mask)
    return out


def decoder_tokens(loaded: Loaded, ids: Any, mask: Any | None) -> Any:
    """The decoder's tokens for drawn `ids`, as `with_decoder_inputs` gives them, without building
    the encoder's side: a speech encoder-decoder's decoder reads the drawn tokens themselves; a token
    one's reads a fixed map of the encoder's token at each position, pad where the mask is 0."""
    if speech_encoder(loaded.model.config):
        return ids
    from conformance.strategies import FIRST_TOKEN

    span = loaded.vocab_size - FIRST_TOKEN
    decoder = FIRST_TOKEN + (ids * DECODER_TOKEN_STRIDE + DECODER_TOKEN_OFFSET) % span
    return decoder if mask is None else decoder.where(mask.bool(), loaded.pad_id)


def speech_inputs(loaded: Loaded, inputs: dict[str, Any]) -> dict[str, Any]:
    """A speech encoder-decoder's call: the tokens and mask move to the decoder, and each row's
    encoder input is `strategies.log_mel_features` of its real tokens, in the dtype and on the
    device of the encoder's first convolution. The encoder takes no padding mask: its input is
    always the full fixed-length window (`zoo.speech_encoder_positions`)."""
    import torch

    from conformance.strategies import log_mel_features

    config = loaded.model.config
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    frames = 2 * speech_encoder_positions(config)
    features = torch.stack([log_mel_features(ids[row][real[row]].cpu(), int(config.num_mel_bins), frames)
                            for row in range(ids.shape[0])])
    conv = getattr(loaded.model.get_encoder(), "conv1", None)  # an exported graph: fp32 features
    device, dtype = (conv.weight.device, conv.weight.dtype) if conv else (loaded.device, torch.float32)
    out = {key: value for key, value in inputs.items() if key not in ("input_ids", "attention_mask")}
    out.update(input_features=features.to(device, dtype), decoder_input_ids=decoder_tokens(loaded, ids, mask))
    if mask is not None:
        out["decoder_attention_mask"] = mask
    return out


def encoder_decoder_inputs(loaded: Loaded, encoder: tuple[Any, Any],
                           decoder: tuple[Any, Any]) -> dict[str, Any]:
    """An encoder-decoder's call with each side given as (ids, mask): token ids for a token
    encoder, or for a speech encoder its features drawn from those ids (`speech_inputs`), on the
    model's device."""
    (encoder_ids, encoder_mask), (decoder_ids, decoder_mask) = encoder, decoder
    inputs = {"input_ids": encoder_ids, "attention_mask": encoder_mask}
    if speech_encoder(loaded.model.config):
        inputs = speech_inputs(loaded, inputs)
    inputs.update(decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask)
    return {key: value.to(loaded.device) for key, value in inputs.items()}


def main_output(loaded: Loaded, out: Any) -> Any:
    """Logits (decoders, encoder-decoders: the decoder's) or the last hidden state (encoders) of
    an output object or tuple, as float64 on CPU."""
    import torch

    if isinstance(out, tuple):
        tensor = out[0]
    else:
        tensor = out.last_hidden_state if loaded.zoo.kind == "encoder" else out.logits
    return tensor.detach().to("cpu", torch.float64)


def forward(loaded: Loaded, batch: BatchSpec, counter: OpCounter | None = None) -> Any:
    """Outputs (logits / last hidden state) as float64 on CPU, run inside the variant's context."""
    return run_inputs(loaded, model_inputs(loaded, batch), counter)


def forward_ids(loaded: Loaded, input_ids: Any, mask: Any, counter: OpCounter | None = None) -> Any:
    """`forward` on given ids and mask (a chunk, a prefix, one row) rather than a drawn batch."""
    return run_inputs(loaded, plain_inputs(loaded, input_ids, mask), counter)


def run_inputs(loaded: Loaded, inputs: dict[str, Any], counter: OpCounter | None = None) -> Any:
    """The main output (`main_output`) of the model called on `inputs` as they are (no mask, an
    option, a cache): the one place a check's forward goes through `call_model`."""
    return main_output(loaded, call_model(loaded, inputs, counter))


class ModelCache:
    """Loads each (model, variant, dtype) once per session, when checks run in ordering.run_order.

    Resident at a time: the current model's golden and plain references (every check of the model
    compares with them) and the one variant under test (plus the last one before it, for the
    checks that hold two). Checks run grouped by variant, so an evicted variant is not asked for
    again; the bound keeps a user's large checkpoint from having every variant in memory at once.
    """

    KEEP_VARIANTS = 2  # the variant under test and the one before it
    OUTPUT_BYTES = 2 * 2**30  # memoized golden/reference outputs (the zoo's whole run stays under)

    def __init__(self, workdir: Path, device: str, golden: str = "auto") -> None:
        self.workdir = workdir
        self.device = device
        self.golden_mode = golden  # "auto" (sizing.golden_choice), "fp64" or "device" (--golden)
        self._loaded: dict[tuple[str, str, str, str], Loaded | LoadError] = {}
        self._current_model: str | None = None
        self._outputs: dict[tuple[Any, ...], Any] = {}
        self._output_sizes: dict[tuple[Any, ...], int] = {}  # bytes of each memoized output
        self._golden_choices: dict[str, GoldenChoice] = {}
        self._built: set[tuple[str, str, str, str]] = set()  # keys built from the reference

    def get(self, zoo_model: ZooModel, variant: Variant, dtype: str, device: str | None = None,
            from_pretrained: bool = False) -> Loaded:
        """The loaded variant; a failed load is remembered and re-raised, not retried.
        `from_pretrained`: the check judges from_pretrained's own handling of the variant's
        kwargs (a refusal), so the variant is never built from the resident reference."""
        device = device or self.device
        if zoo_model.name != self._current_model:
            self._loaded.clear()  # bounded memory for users' large checkpoints
            self._outputs.clear()
            self._output_sizes.clear()
            self._built.clear()
            self._current_model = zoo_model.name
        key = (zoo_model.name, variant.id, dtype, device)
        if from_pretrained and key in self._built:
            del self._loaded[key]
            self._built.discard(key)
        if key not in self._loaded:
            self._evict_variants(keep=self.KEEP_VARIANTS - 1)
            found: Loaded | LoadError | None = None
            if not from_pretrained:
                try:
                    found = self._from_reference(zoo_model, variant, dtype, device)
                except LoadError as exc:  # the library refused the switch: as it refuses the load
                    found = exc
            if found is not None:
                self._built.add(key)
            cache_load("/".join(key), from_disk=found is None)
            if found is None:
                try:
                    found = load(zoo_model, variant, dtype, device, self.workdir)
                except LoadError as exc:
                    found = exc
            self._loaded[key] = found
        found = self._loaded[key] = self._loaded.pop(key)  # most recently used last
        if isinstance(found, LoadError):
            raise found
        return found

    def _from_reference(self, zoo_model: ZooModel, variant: Variant, dtype: str,
                        device: str) -> Loaded | None:
        """`variant` built from the plain reference of the same model, dtype and device, sharing
        its weights (`built_from`), or None where it needs its own load. A golden run is built so
        only when that reference is resident already: a float64 golden never loads a float64
        reference nobody asked for."""
        from conformance.variants import REFERENCE, REGISTRY

        if variant.reference or (variant.id.startswith("golden")
                                 and (zoo_model.name, REFERENCE, dtype, device) not in self._loaded):
            return None
        try:
            reference = self.get(zoo_model, REGISTRY[REFERENCE], dtype, device)
        except LoadError:
            return None  # the variant's own load says why it cannot load
        return built_from(reference, variant, self.workdir)

    def _evict_variants(self, keep: int) -> None:
        """Forget all but the `keep` most recently loaded variants under test (golden runs and
        plain references stay). A load failure is remembered whatever it is: it holds no model."""
        under_test = [key for key, found in self._loaded.items() if isinstance(found, Loaded)
                      and not (found.variant.reference or found.variant.id.startswith("golden"))]
        for key in under_test[:max(0, len(under_test) - keep)]:
            del self._loaded[key]
            self._built.discard(key)

    def outputs(self, loaded: Loaded, batch: BatchSpec, per_row: bool = False) -> Any:
        """Forward of a reference or golden model, memoized: every variant compares to the same.
        The memo holds at most OUTPUT_BYTES, least recently used out first: a real checkpoint's
        logits are [batch, length, vocabulary] in float64 (132 MB for 4 x 129 tokens of a 32k
        vocabulary), and a run draws hundreds of batches. A forward done again gives the same
        bits (CPU golden and reference runs are deterministic), so eviction changes no verdict."""
        key = (loaded.zoo.name, loaded.variant.id, loaded.dtype, loaded.device, batch, per_row)
        return self.memoized(
            key, lambda: forward_per_row(loaded, batch) if per_row else forward(loaded, batch))

    def memoized(self, key: tuple[Any, ...], compute: Any) -> Any:
        """`compute()` kept in the bounded output memo under `key` (`outputs` says why it may be)."""
        if key not in self._outputs:
            out = compute()
            self._outputs[key], self._output_sizes[key] = out, _nbytes(out)
            self._bound_outputs()
        found = self._outputs[key] = self._outputs.pop(key)  # most recently used last
        return found

    def routing_margins(self, golden: Loaded, batch: BatchSpec) -> Any:
        """The golden run's top-k routing margins of a mixture of experts' batch (routing.py),
        memoized as outputs are."""
        from conformance.routing import margins_per_row

        key = (golden.zoo.name, golden.variant.id, golden.dtype, golden.device, batch, "routing")
        if key not in self._outputs:
            out = margins_per_row(golden, batch)
            self._outputs[key], self._output_sizes[key] = out, _nbytes(out)
            self._bound_outputs()
        found = self._outputs[key] = self._outputs.pop(key)
        return found

    def _bound_outputs(self) -> None:
        total = sum(self._output_sizes.values())
        for key in list(self._outputs)[:-1]:  # never the output just computed
            if total <= self.OUTPUT_BYTES:
                break
            total -= self._output_sizes.pop(key)
            del self._outputs[key]

    def golden(self, zoo_model: ZooModel, dtype: str) -> Loaded:
        """The golden run's model: eager in float64 on CPU where the model fits
        (sizing.golden_choice); otherwise, and for half dtypes on a GPU, eager in float32 on the
        run's device with TF32 off (variants.GOLDEN_DEVICE). The check's record names it."""
        from conformance.compare import judge_against
        from conformance.timing import golden_used
        from conformance.variants import GOLDEN, GOLDEN_DEVICE

        if self.device != "cpu" and dtype in ("fp16", "bf16"):
            found, why = self.get(zoo_model, GOLDEN_DEVICE, "fp32"), f"{dtype} on a GPU"
        elif not (choice := self.golden_choice(zoo_model)).fp64:
            found, why = self.get(zoo_model, GOLDEN_DEVICE, "fp32"), choice.why
        else:
            found, why = self.get(zoo_model, GOLDEN, "fp64", device="cpu"), ""
        # the usual golden is named alone; any other says why it was chosen (sizing.golden_choice)
        named = f"eager {found.dtype} on {found.device}"
        golden_used(f"{named} ({zoo_model.name}: {why})" if why else named)
        judge_against(found.dtype)
        return found

    def golden_choice(self, zoo_model: ZooModel) -> GoldenChoice:
        """Whether `zoo_model`'s golden run can be float64, decided once per run from its size
        and the memory available then, so that one run never mixes goldens for a model."""
        if zoo_model.name not in self._golden_choices:
            if self.golden_mode != "auto":
                choice = GoldenChoice(self.golden_mode == "fp64", f"--golden {self.golden_mode}")
            else:
                try:
                    directory = local_dir(zoo_model, self.workdir)
                    parameters = parameter_count(directory) if directory is not None else None
                except Exception:  # unbuildable or unreadable: its load says why, in one line
                    parameters = None
                choice = golden_choice(parameters, available_memory())
            self._golden_choices[zoo_model.name] = choice
        return self._golden_choices[zoo_model.name]


def _nbytes(output: Any) -> int:
    """Bytes of a memoized output: a tensor, or a tuple/list/dict of them (a seq2seq pair)."""
    if hasattr(output, "element_size") and hasattr(output, "numel"):
        return int(output.element_size() * output.numel())
    if isinstance(output, dict):
        return sum(_nbytes(value) for value in output.values())
    if isinstance(output, (tuple, list)):
        return sum(_nbytes(value) for value in output)
    return 0


def forward_per_row(loaded: Loaded, batch: BatchSpec) -> Any:
    """Each row alone, unpadded: what a causal decoder's answer for that sequence *is*.

    The golden run of a padded batch for decoders: it needs no padding mask at all, so it is
    immune to mask-building bugs in float64 (transformers 4.48 overflows building gpt2/opt masks
    in float64; 5.23's eager float64 turns left-padded rows into NaN). Padded positions are NaN.
    """
    import torch

    input_ids, mask = batch.materialize(loaded.vocab_size, loaded.pad_id)
    rows = []
    for row in range(len(batch.lengths)):
        real = mask[row].bool()
        ids = input_ids[row][real][None]
        out = forward_ids(loaded, ids, torch.ones_like(ids))
        full = torch.full((batch.width, out.shape[-1]), float("nan"), dtype=torch.float64)
        full[real] = out[0]
        rows.append(full)
    return torch.stack(rows)
