"""Hypothesis strategies for token batches, and the batches they describe.

A drawn `BatchSpec` is model-independent (lengths, padding side, a token seed), so one
strategy serves every model and a failure shrinks to the smallest batch: one row, no padding,
the shortest length. Simplest alternatives come first in every `sampled_from` / `one_of`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

# lengths at the block boundaries of flash / memory-efficient kernels (32, 64, 128 tiles)
BOUNDARY_LENGTHS = (31, 32, 33, 63, 64, 65, 127, 128, 129)
PADDINGS = ("none", "right", "left")
FIRST_TOKEN = 4  # ids below this are specials (pad/bos/eos/unk) in every zoo model


@dataclass(frozen=True)
class BatchSpec:
    """Rows of real-token lengths, padded to the longest on one side."""

    lengths: tuple[int, ...]
    padding: str
    seed: int = 0

    @property
    def width(self) -> int:
        return max(self.lengths)

    def mask(self) -> Any:
        """Attention mask (1 = real token) as an int64 CPU tensor."""
        import torch

        width = self.width
        mask = torch.zeros(len(self.lengths), width, dtype=torch.long)
        for row, n in enumerate(self.lengths):
            if self.padding == "left":
                mask[row, width - n:] = 1
            else:
                mask[row, :n] = 1
        return mask

    def rows(self, vocab_size: int) -> list[Any]:
        """Each row's real tokens (int64 CPU tensors); a row's content depends only on the seed and
        its index, not on the padding side, so the same sequences can be padded either way."""
        import torch

        out = []
        for row, n in enumerate(self.lengths):
            gen = torch.Generator().manual_seed(self.seed * 1009 + row)
            out.append(torch.randint(FIRST_TOKEN, vocab_size, (n,), generator=gen))
        return out

    def materialize(self, vocab_size: int, pad_id: int) -> tuple[Any, Any]:
        """(input_ids, attention_mask) as int64 CPU tensors; pad positions hold `pad_id`."""
        return pad_rows(self.rows(vocab_size), self.padding, pad_id, self.width)

    def reproduction(self) -> str:
        return (
            "from conformance.strategies import BatchSpec\n"
            f"batch = BatchSpec(lengths={self.lengths!r}, padding={self.padding!r}, seed={self.seed})"
        )


def log_mel_features(tokens: Any, mel_bins: int, frames: int) -> Any:
    """A speech encoder's input for one row: [mel_bins, frames] float64 values, standard normal
    like normalized log-mel features, drawn from a generator seeded by the row's real tokens.
    So a drawn batch draws its audio too, and a row's features are the same alone, padded on
    either side or in another batch: the golden run's rows and a variant's batch hear the same."""
    import zlib

    import torch

    seed = zlib.crc32(tokens.to(torch.int64).numpy().tobytes())
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((mel_bins, frames), generator=gen, dtype=torch.float64)


def pad_rows(rows: list[Any], side: str, pad_id: int, width: int | None = None,
             fill: Any = None) -> tuple[Any, Any]:
    """Rows of real tokens padded to `width` on `side` ("none" means right): (input_ids, mask).

    `fill` (a tensor as wide as the batch) replaces the pad id at padded positions: real tokens
    must not see what sits there.
    """
    import torch

    width = width if width is not None else max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row)
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        if n:
            input_ids[i, cols] = row
            mask[i, cols] = 1
    if fill is not None:
        input_ids = torch.where(mask.bool(), input_ids, fill)
    return input_ids, mask


def lengths(max_len: int) -> st.SearchStrategy[int]:
    boundaries = [n for n in BOUNDARY_LENGTHS if n <= max_len]
    return st.one_of(st.integers(1, max_len), st.sampled_from(boundaries)) if boundaries \
        else st.integers(1, max_len)


@st.composite
def batch_specs(
    draw: st.DrawFn, padding: str | None = None, max_batch: int = 4, max_len: int = 129
) -> BatchSpec:
    """A batch; with padding "right"/"left" rows have different lengths (one row is full width)."""
    side = padding or draw(st.sampled_from(PADDINGS), label="padding")
    size = draw(st.integers(1 if side == "none" else 2, max_batch), label="batch size")
    seed = draw(st.integers(0, 2**16), label="token seed")
    if side == "none":
        n = draw(lengths(max_len), label="length")
        return BatchSpec((n,) * size, side, seed)
    return BatchSpec(uneven_lengths(draw, size, max_len), side, seed)


def uneven_lengths(draw: st.DrawFn, size: int, max_len: int, side: str = "") -> tuple[int, ...]:
    """`size` rows' lengths for a padded batch: one full width, the others shorter, the full row
    at a drawn position. `side` prefixes the labels ("decoder") where a draw holds two batches."""
    prefix = f"{side} " if side else ""
    full = draw(lengths(max_len).filter(lambda n: n >= 2), label=f"{prefix}full length")
    shorter = draw(
        st.lists(st.integers(1, full - 1), min_size=size - 1, max_size=size - 1),
        label=f"{prefix}shorter lengths",
    )
    position = draw(st.integers(0, size - 1), label=f"{prefix}row of the full-length sequence")
    rows = list(shorter)
    rows.insert(position, full)
    return tuple(rows)


@st.composite
def encoder_decoder_batches(draw: st.DrawFn, max_batch: int = 4,
                            max_len: int = 129) -> tuple[BatchSpec, BatchSpec]:
    """An encoder-decoder's two sides drawn on their own: (encoder rows, decoder rows), as many of
    each, of independent lengths and tokens. The encoder's are unpadded or right-padded, the
    decoder's right-padded with one row full width; neither side's padding follows the other's."""
    encoder = draw(batch_specs(padding=draw(st.sampled_from(("none", "right")), label="encoder padding"),
                               max_batch=max_batch, max_len=max_len), label="encoder rows")
    size = max(2, len(encoder.lengths))
    if size > len(encoder.lengths):  # an unpadded encoder batch of one row: one more of its length
        encoder = BatchSpec((encoder.lengths[0],) * size, encoder.padding, encoder.seed)
    rows = uneven_lengths(draw, size, max_len, side="decoder")
    seed = draw(st.integers(0, 2**16), label="decoder token seed")
    return encoder, BatchSpec(rows, "right", seed)
