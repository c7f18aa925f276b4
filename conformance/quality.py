"""How far quantization moves a real model's answers (C10, C11), on text the suite ships.

Decoders: next-token distributions of the quantized model against the golden run of the same
model (float64 on CPU) over several windows of ``fixtures/text/corpus.txt``: mean KL divergence
KL(golden || quantized), top-1 agreement, and the perplexity ratio. Encoders: cosine similarity
of mean-pooled embeddings per sentence (worst and mean). Only real weights give meaningful
figures: random-init models are not judged here. Encoder-decoders are judged as decoders, on
the decoder's predictions (teacher-forced) of the corpus window its encoder reads.
"""

from __future__ import annotations

import functools
from typing import Any

from conformance.running import Loaded
from conformance.zoo import fixtures_dir

WINDOWS = 4  # decoder windows of the corpus, spread over the file
WINDOW_TOKENS = 64
SENTENCES = 16  # encoder sentences: the corpus's first lines long enough to be sentences
MIN_SENTENCE_CHARS = 40


def corpus() -> str:
    return (fixtures_dir() / "text" / "corpus.txt").read_text()


def tokenizer(location: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location)


@functools.lru_cache(maxsize=4)
def decoder_inputs(location: str) -> Any:
    """[WINDOWS, WINDOW_TOKENS] token ids: equal windows at even strides over the corpus
    (memoized: callers must not modify the tensor)."""
    import torch

    lines = tokenizer(location)(corpus().splitlines(), add_special_tokens=False)["input_ids"]
    ids = [token for line in lines for token in line]
    if len(ids) < WINDOWS * WINDOW_TOKENS:
        raise ValueError(f"corpus gives {len(ids)} tokens, fewer than {WINDOWS} x {WINDOW_TOKENS}")
    stride = (len(ids) - WINDOW_TOKENS) // (WINDOWS - 1)
    return torch.tensor([ids[i * stride:i * stride + WINDOW_TOKENS] for i in range(WINDOWS)])


SOURCE_TOKENS, TARGET_TOKENS = 48, 32  # an encoder-decoder's window, and how much of it it writes


@functools.lru_cache(maxsize=4)
def seq2seq_inputs(location: str) -> dict[str, Any]:
    """Encoder-decoders: WINDOWS windows of the corpus as encoder input, and as decoder input the
    decoder start token then the window's first TARGET_TOKENS - 1 tokens (teacher forcing): the
    trained seq2seq's task is to write what its encoder reads (fixtures/train_seq2seq.py), and
    position j's logits predict decoder token j + 1, as a decoder's do (decoder_figures).
    Memoized."""
    import json
    from pathlib import Path

    import torch

    start = json.loads((Path(location) / "config.json").read_text())["decoder_start_token_id"]
    lines = tokenizer(location)(corpus().splitlines(), add_special_tokens=False)["input_ids"]
    ids = [token for line in lines for token in line]
    stride = (len(ids) - SOURCE_TOKENS) // (WINDOWS - 1)
    windows = torch.tensor([ids[i * stride:i * stride + SOURCE_TOKENS] for i in range(WINDOWS)])
    starts = torch.full((WINDOWS, 1), int(start), dtype=torch.long)
    return {"input_ids": windows,
            "decoder_input_ids": torch.cat([starts, windows[:, :TARGET_TOKENS - 1]], dim=1)}


def sentences() -> list[str]:
    lines = [ln.strip() for ln in corpus().splitlines() if len(ln.strip()) >= MIN_SENTENCE_CHARS]
    return lines[:SENTENCES]


@functools.lru_cache(maxsize=4)
def encoder_inputs(location: str) -> dict[str, Any]:
    """Memoized: callers must not modify the tensors."""
    return dict(tokenizer(location)(sentences(), padding=True, return_tensors="pt"))


def run(loaded: Loaded, inputs: dict[str, Any]) -> Any:
    """Logits / last hidden state as float64 on CPU, in the variant's context."""
    import torch

    placed = {k: v.to(loaded.device) for k, v in inputs.items()}
    with torch.inference_mode(), loaded.variant.context():
        out = loaded.model(**placed)
    tensor = out.last_hidden_state if loaded.zoo.kind == "encoder" else out.logits
    return tensor.detach().to("cpu", torch.float64)


def decoder_figures(quant_logits: Any, golden_logits: Any, ids: Any) -> dict[str, float]:
    """Mean KL(golden || quantized) per position, top-1 agreement, perplexity ratio."""
    import torch

    logp_q = torch.log_softmax(quant_logits, -1)
    logp_g = torch.log_softmax(golden_logits, -1)
    kl = (logp_g.exp() * (logp_g - logp_q)).sum(-1)
    top1 = (quant_logits.argmax(-1) == golden_logits.argmax(-1)).double()
    targets = ids[:, 1:].unsqueeze(-1)
    nll_q = -logp_q[:, :-1].gather(-1, targets).mean()
    nll_g = -logp_g[:, :-1].gather(-1, targets).mean()
    return {
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1_agreement": float(top1.mean()),
        "perplexity": float(nll_q.exp()),
        "golden_perplexity": float(nll_g.exp()),
        "perplexity_ratio": float((nll_q - nll_g).exp()),
        "positions": int(kl.numel()),
    }


def mean_pooled(hidden: Any, mask: Any) -> Any:
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1)


def encoder_figures(quant_hidden: Any, golden_hidden: Any, mask: Any) -> dict[str, float]:
    """Cosine similarity of mean-pooled sentence embeddings, per sentence."""
    import torch

    cos = torch.nn.functional.cosine_similarity(
        mean_pooled(quant_hidden, mask), mean_pooled(golden_hidden, mask), dim=-1)
    return {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "sentences": int(cos.numel())}

