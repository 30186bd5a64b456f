"""Text encoders: prompt -> embeddings [1, text_len, text_dim] for the DiT's cross-attention.

- ``UMT5TextEncoder``: the Wan text encoder (umt5-xxl encoder) through transformers, read from a local directory
  only. As in Wan, the output keeps the prompt's tokens (including the closing </s>) and is zero beyond them.
- ``HashTextEncoder``: no download at all: words hashed into a learnable embedding table (the toy world trains it).

Both cache results per prompt (bounded, least recently used first out) because an engine encodes the same prompt
for every block of a session, and both refuse a prompt that is not a ``str`` with a TypeError naming the type.
"""
from __future__ import annotations

import os
import re
import zlib
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["UMT5TextEncoder", "HashTextEncoder"]


def _check_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return prompt


class _LRU:
    def __init__(self, size: int):
        if size < 0:
            raise ValueError(f"cache size must be >= 0, got {size}")
        self.size, self.data = size, OrderedDict()

    def get(self, key):
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key]
        return None

    def put(self, key, value):
        if self.size == 0:
            return
        self.data[key] = value
        self.data.move_to_end(key)
        while len(self.data) > self.size:
            self.data.popitem(last=False)

    def clear(self):
        self.data.clear()

    def __len__(self):
        return len(self.data)


class UMT5TextEncoder(nn.Module):
    """UMT5 encoder + tokenizer from a local directory (``text_encoder/`` + ``tokenizer/`` of a diffusers Wan
    pipeline, or one directory holding both). Never touches the network (``local_files_only``)."""

    def __init__(self, model, tokenizer, text_len: int = 512, cache_size: int = 64):
        super().__init__()
        if text_len <= 0:
            raise ValueError(f"text_len must be positive, got {text_len}")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = int(text_len)
        self._cache = _LRU(cache_size)

    @classmethod
    def from_dir(cls, path: str | os.PathLike, text_len: int = 512, *, device="cpu",
                 dtype: torch.dtype = torch.float32, cache_size: int = 64) -> "UMT5TextEncoder":
        from transformers import AutoTokenizer, UMT5EncoderModel
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"text encoder directory not found: {path}")
        model_dir = path / "text_encoder" if (path / "text_encoder").is_dir() else path
        tok_dir = path / "tokenizer" if (path / "tokenizer").is_dir() else path
        if not (model_dir / "config.json").exists():
            raise FileNotFoundError(f"no UMT5 config.json in {model_dir}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"no usable tokenizer in {tok_dir}: {e}") from None
        # the keyword for the load dtype changed name in transformers 4.56 (torch_dtype -> dtype); loading
        # straight in the target dtype avoids a float32 copy of a 5.7B-parameter encoder
        import transformers
        from packaging.version import Version
        key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        model = UMT5EncoderModel.from_pretrained(str(model_dir), local_files_only=True, **{key: dtype})
        return cls(model.to(device), tokenizer, text_len=text_len, cache_size=cache_size)

    @property
    def text_dim(self) -> int:
        return int(self.model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        """prompt -> [1, text_len, text_dim] float32, zero after the prompt's tokens (truncated to text_len)."""
        prompt = _check_prompt(prompt)
        hit = self._cache.get(prompt)
        if hit is not None:
            return hit.clone()
        tok = self.tokenizer(prompt, padding="max_length", max_length=self.text_len, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        n = int(mask.sum())
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # [1, text_len, d]
        out = torch.zeros_like(hidden)
        out[:, :n] = hidden[:, :n]  # Wan keeps only the prompt's tokens and pads with zeros, not pad-token states
        self._cache.put(prompt, out)
        return out.clone()

    def forward(self, prompt: str) -> torch.Tensor:
        return self.encode(prompt)


class HashTextEncoder(nn.Module):
    """Words -> crc32 buckets -> learnable embeddings; [1, text_len, text_dim], zero after the last word.

    Lower-cases, splits on anything that is not a letter, digit, underscore or apostrophe, keeps the first
    text_len words. crc32 is stable across processes and platforms (Python's hash() is salted per process).
    """

    def __init__(self, text_dim: int, text_len: int, vocab: int = 4096, seed: int = 0, cache_size: int = 256):
        super().__init__()
        for name, v in (("text_dim", text_dim), ("text_len", text_len), ("vocab", vocab)):
            if int(v) <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        self.text_dim, self.text_len, self.vocab = int(text_dim), int(text_len), int(vocab)
        self.embedding = nn.Embedding(self.vocab, self.text_dim)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.embedding.weight.copy_(torch.randn(self.vocab, self.text_dim, generator=g))
        self._cache = _LRU(cache_size)

    def token_ids(self, prompt: str) -> list[int]:
        words = re.findall(r"[\w']+", _check_prompt(prompt).lower())[: self.text_len]
        return [zlib.crc32(w.encode("utf-8")) % self.vocab for w in words]

    def train(self, mode: bool = True):
        self._cache.clear()  # cached outputs were computed from weights that training will change
        return super().train(mode)

    def encode(self, prompt: str) -> torch.Tensor:
        """prompt -> [1, text_len, text_dim]; differentiable in training mode, cached and detached otherwise."""
        ids = self.token_ids(prompt)
        w = self.embedding.weight
        # the weight's version counter moves on every in-place update, so a stale entry is never returned
        key = (prompt, w._version, w.device, w.dtype)
        if not self.training:
            hit = self._cache.get(key)
            if hit is not None:
                return hit.clone()
        emb = self.embedding(torch.tensor(ids, dtype=torch.long, device=w.device))  # [n, text_dim]
        pad = emb.new_zeros(self.text_len - len(ids), self.text_dim)
        out = torch.cat([emb, pad], dim=0)[None]  # [1, text_len, text_dim]
        if self.training:
            return out
        out = out.detach()
        self._cache.put(key, out)
        return out.clone()

    def forward(self, prompt: str) -> torch.Tensor:
        return self.encode(prompt)
