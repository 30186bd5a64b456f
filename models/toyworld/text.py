"""The trainer's text encoder: hashed words looked up in a learnable embedding table.

A prompt is lower-cased, split into words, each word hashed (CRC32 salted by ``seed``) into ``1..vocab-1``
(0 is never used, so no word shares a row with a padding convention) and embedded; the result is zero-padded to
``text_len`` tokens. It has the interface of the shared ``models.text_encoder.HashTextEncoder`` (which the
engine loads), but hashes differently; ``to_shared_table`` re-indexes a trained table for the shared encoder
when the bundle is exported (the training checkpoints keep this layout so that a resumed run is unchanged).
"""
from __future__ import annotations

import re
import zlib

import torch
import torch.nn as nn

__all__ = ["LocalHashTextEncoder", "word_ids", "shared_word_id", "to_shared_table", "from_shared_table",
           "collision_free_vocab"]


def word_ids(prompt: str, text_len: int, vocab: int, seed: int) -> list[int]:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    words = re.findall(r"[a-z0-9]+", prompt.lower())[:text_len]
    return [1 + zlib.crc32(f"{seed}:{w}".encode()) % (vocab - 1) for w in words]


class LocalHashTextEncoder(nn.Module):
    def __init__(self, text_dim: int, text_len: int, vocab: int = 4096, seed: int = 0):
        super().__init__()
        if vocab < 2:
            raise ValueError(f"vocab must be at least 2, got {vocab}")
        self.text_dim, self.text_len, self.vocab, self.seed = text_dim, text_len, vocab, seed
        self.embedding = nn.Embedding(vocab, text_dim)
        with torch.no_grad():
            self.embedding.weight.mul_(0.5)

    def encode(self, prompt: str) -> torch.Tensor:
        """prompt -> [1, text_len, text_dim]; padding positions are exactly zero."""
        ids = word_ids(prompt, self.text_len, self.vocab, self.seed)
        out = self.embedding.weight.new_zeros(1, self.text_len, self.text_dim)
        if ids:
            idx = torch.tensor(ids, device=self.embedding.weight.device)
            out = torch.cat([self.embedding(idx)[None], out[:, len(ids):]], dim=1)
        return out

    def forward(self, prompt: str) -> torch.Tensor:
        return self.encode(prompt)


def shared_word_id(word: str, vocab: int) -> int:
    """Row of a word in the shared ``HashTextEncoder`` table (unsalted CRC32 modulo vocab)."""
    return zlib.crc32(word.encode("utf-8")) % vocab


def collision_free_vocab(words: list[str], start: int = 4096) -> int:
    """The smallest table size >= start in which the shared hashing gives every word its own row."""
    v = start
    while len({shared_word_id(w, v) for w in set(words)}) < len(set(words)):
        v += 1
    return v


def to_shared_table(local: LocalHashTextEncoder, words: list[str], vocab: int) -> torch.Tensor:
    """Re-index a trained local table for the shared encoder: [vocab, text_dim], the row of each known word
    moved to its shared id; every other row is zero, so a word never seen in training reads like padding."""
    table = local.embedding.weight.detach().new_zeros(vocab, local.text_dim)
    seen: dict[int, str] = {}
    for w in words:
        j = shared_word_id(w, vocab)
        if j in seen and seen[j] != w:
            raise ValueError(f"words {seen[j]!r} and {w!r} share row {j} of a {vocab}-row table; pick another vocab")
        seen[j] = w
        (i,) = word_ids(w, 1, local.vocab, local.seed)
        table[j] = local.embedding.weight.detach()[i]
    return table


def from_shared_table(table: torch.Tensor, local: LocalHashTextEncoder, words: list[str]) -> None:
    """The inverse of ``to_shared_table`` for the known words: copy each word's shared row into its row of
    ``local`` (in place), so that a trainer can start again from an exported bundle."""
    vocab = table.shape[0]
    if table.ndim != 2 or table.shape[1] != local.text_dim:
        raise ValueError(f"shared text table has shape {tuple(table.shape)}, expected [vocab, {local.text_dim}]")
    with torch.no_grad():
        for w in words:
            (i,) = word_ids(w, 1, local.vocab, local.seed)
            local.embedding.weight[i] = table[shared_word_id(w, vocab)]
