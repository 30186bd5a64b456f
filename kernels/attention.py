"""Attention backends and the metadata a forward pass hands them.

A self-attention layer calls ``backend.attend(q, k, v, layer, meta)`` with q/k/v of the tokens of the
current pass ([B, L, H, D], RoPE already applied). ``meta`` says what those tokens may see:

- ``DenseMeta``: every token sees every token of the pass (bidirectional clip, diffusers-equivalent).
- ``BlockCausalMeta``: the pass is a whole clip of blocks; a token sees its own block and every earlier
  block (used by training and by the "incremental equals full" checks).
- ``PagedMeta``: the pass is one block per batch row; each row sees its session's committed pages (found
  through its block table) followed by the block's own fresh K/V, bidirectionally inside the block. A
  commit pass also stores the block's K/V into the pages named in ``write_pages``.

Backends: ``reference`` (naive explicit softmax in fp32), ``sdpa`` (torch scaled_dot_product_attention),
``flex`` (FlexAttention with a block mask) and ``triton`` (paged Triton kernel, kernels/paged_attention.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .rope import rope_table, rotate_pairs, torch_apply_rope

__all__ = [
    "DenseMeta", "BlockCausalMeta", "PagedMeta", "KVPool", "AttentionBackend", "get_backend",
    "BACKENDS", "reference_store_kv", "gather_context",
]


@dataclass
class DenseMeta:
    pass


@dataclass
class BlockCausalMeta:
    frame_tokens: int  # tokens per latent frame
    block_frames: int  # frames per block; block i = frames [i*block_frames, (i+1)*block_frames)
    window_frames: int | None = None  # a block sees only the latest window_frames frames up to its end (a rolling
    # cache of that many frames; None: every earlier frame)

    def frame_mask(self, frames: int, device) -> torch.Tensor:
        """Bool [F, F], True where query frame i may attend key frame j: j's block is not later than i's and, with a
        window, j lies in the window_frames frames that end with i's block."""
        f = torch.arange(frames, device=device)
        blk = f // self.block_frames
        ok = blk[None, :] <= blk[:, None]
        if self.window_frames is not None:
            end = (blk + 1) * self.block_frames  # one past the last frame of each query frame's block
            ok &= f[None, :] >= (end - self.window_frames)[:, None]
        return ok

    def mask(self, length: int, device) -> torch.Tensor:
        """Bool [L, L], True where query token q may attend key token k."""
        fm = self.frame_mask(length // self.frame_tokens, device)
        return fm.repeat_interleave(self.frame_tokens, 0).repeat_interleave(self.frame_tokens, 1)


@dataclass
class KVPool:
    """Per-layer K and V pools, allocated once: [num_pages, page_tokens, kv_heads, head_dim] each.

    ``groups``: further per-page caches a model keeps beside its self-attention K/V (a model adapter's
    ``cache_groups``, e.g. the keyboard and mouse caches of an action module), name -> [num_pages, ...]. Row p of
    every group belongs to page row p, so whatever moves, copies or frees a page covers them too
    (``page_tensors``)."""
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    groups: dict = field(default_factory=dict)

    @classmethod
    def allocate(cls, num_layers: int, num_pages: int, page_tokens: int, kv_heads: int, head_dim: int,
                 dtype=torch.float32, device="cpu", groups: dict | None = None) -> "KVPool":
        """groups: name -> the shape of one page's entry (e.g. (page_tokens, heads, head_dim))."""
        shape = (num_pages, page_tokens, kv_heads, head_dim)
        extra = {name: torch.zeros((num_pages, *per_page), dtype=dtype, device=device)
                 for name, per_page in (groups or {}).items()}
        return cls(k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
                   v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)], groups=extra)

    def page_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Every per-page tensor by a stable name: ``k.<layer>``, ``v.<layer>``, then each group's name."""
        return ([(f"k.{i}", t) for i, t in enumerate(self.k)] + [(f"v.{i}", t) for i, t in enumerate(self.v)]
                + sorted(self.groups.items()))

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def page_tokens(self) -> int:
        return self.k[0].shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.page_tensors())


@dataclass
class PagedMeta:
    pool: KVPool
    block_tables: torch.Tensor  # int32 [B, max_pages]: page ids of each row's committed context, in order
    context_pages: torch.Tensor  # int32 [B]: how many leading entries of block_tables each row reads
    write_pages: torch.Tensor | None = None  # int32 [B, F]: pages receiving this block's K/V (commit pass)
    # When keys are stored without RoPE (cache-relative positions), cos/sin for the cached tokens,
    # [B, max_pages*page_tokens, D/2]; the backend rotates gathered keys before use.
    cache_cos: torch.Tensor | None = None
    cache_sin: torch.Tensor | None = None
    context_pages_list: list[int] | None = None  # host copy, avoids device syncs in python loops

    def __post_init__(self):
        if self.context_pages_list is None:
            self.context_pages_list = [int(n) for n in self.context_pages.tolist()]
        self._rotation = None

    def rotation(self) -> torch.Tensor:
        """cos + i sin of the cached tokens, [B, max_pages*page_tokens, D/2] complex: built once per pass and
        shared by its layers."""
        if self._rotation is None:
            self._rotation = rope_table(self.cache_cos, self.cache_sin)
        return self._rotation


def reference_store_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       write_pages: torch.Tensor) -> None:
    """Write k/v [B, F*T, Hkv, D] of a block into pages write_pages [B, F] of the pools (in place)."""
    B, L, H, D = k.shape
    nF = write_pages.shape[1]
    T = k_pool.shape[1]
    if L != nF * T:
        raise ValueError(f"block has {L} tokens but write_pages names {nF} pages of {T} tokens")
    idx = write_pages.reshape(-1).long()
    k_pool[idx] = k.reshape(B * nF, T, H, D).to(k_pool.dtype)
    v_pool[idx] = v.reshape(B * nF, T, H, D).to(v_pool.dtype)


def gather_context(meta: PagedMeta, layer: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Committed K/V of batch row b: [n_pages*T, Hkv, D] each, rotated if the cache holds raw keys."""
    n = meta.context_pages_list[b]
    pages = meta.block_tables[b, :n].long()
    kp, vp = meta.pool.k[layer], meta.pool.v[layer]
    kc = kp[pages].flatten(0, 1)  # [n*T, Hkv, D]
    vc = vp[pages].flatten(0, 1)
    if meta.cache_cos is not None and n:
        L = kc.shape[0]
        kc = torch_apply_rope(kc[None], meta.cache_cos[b:b + 1, :L], meta.cache_sin[b:b + 1, :L])[0]
    return kc, vc


def _assemble_in_place(k: torch.Tensor, meta: PagedMeta) -> bool:
    """Whether ``_context_and_block`` applies: a float32 block and pool, float32 or float64 angles (else the
    general path)."""
    pool_k = meta.pool.k[0]
    return (k.dtype == torch.float32 and pool_k.dtype == torch.float32 and pool_k.device == k.device
            and (meta.cache_cos is None or meta.cache_cos.dtype in (torch.float32, torch.float64)))


def _context_and_block(k, v, layer: int, meta: PagedMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [B, n*T + L, Hkv, D] of rows that all read n pages: the gathered context (keys rotated
    to their cache positions, as ``torch_apply_rope`` does) then the block's own k/v [B, L, Hkv, D]. Each is
    written straight into one buffer: the same values as gathering, rotating and concatenating, with fewer
    copies (a paged pass on the CPU spends about a third of its attention time on them otherwise)."""
    B, Lq, H, D = k.shape
    n, T = meta.context_pages_list[0], meta.pool.page_tokens
    L = n * T
    pages = meta.block_tables[:, :n].long().reshape(-1)
    kbuf, vbuf = k.new_empty(B, L + Lq, H, D), v.new_empty(B, L + Lq, H, D)
    kc = meta.pool.k[layer].index_select(0, pages)  # [B*n, T, H, D]
    if meta.cache_cos is None:
        kbuf[:, :L] = kc.view(B, L, H, D)
    else:  # rotated straight into the buffer, in the angles' precision
        rotate_pairs(kc.view(B, L, H, D), meta.rotation()[:, :L], out=kbuf[:, :L])
    vp = meta.pool.v[layer]
    for b in range(B):  # each row's slice of the buffer is contiguous: gather into it directly
        torch.index_select(vp, 0, pages[b * n:(b + 1) * n], out=vbuf[b, :L].view(n, T, H, D))
    kbuf[:, L:] = k
    vbuf[:, L:] = v
    return kbuf, vbuf


def _expand_kv(k: torch.Tensor, heads: int) -> torch.Tensor:
    """Repeat KV heads for grouped-query attention: [..., Hkv, D] -> [..., H, D]."""
    hkv = k.shape[-2]
    if hkv == heads:
        return k
    return k.repeat_interleave(heads // hkv, dim=-2)


class AttentionBackend:
    name = "base"

    def attend(self, q, k, v, layer: int, meta, k_raw: torch.Tensor | None = None) -> torch.Tensor:
        """q/k/v [B, L, H(kv), D] with RoPE applied; k_raw: the same keys before RoPE, stored instead of k
        when the cache holds unrotated keys (cache-relative positions)."""
        if isinstance(meta, PagedMeta):
            if meta.write_pages is not None:
                self.write_kv(k, v, layer, meta, k_raw=k_raw)
            return self.paged(q, k, v, layer, meta)
        if isinstance(meta, BlockCausalMeta):
            return self.masked(q, k, v, meta.mask(q.shape[1], q.device))
        if meta is None or isinstance(meta, DenseMeta):
            return self.masked(q, k, v, None)
        raise TypeError(f"unknown attention metadata {type(meta).__name__}")

    def write_kv(self, k, v, layer: int, meta, k_raw: torch.Tensor | None = None) -> None:
        """The cache write of ``attend`` alone (a commit pass's last layer): k/v [B, L, Hkv, D] into the pages
        ``meta.write_pages`` names, the keys before RoPE when the cache holds unrotated keys."""
        if not isinstance(meta, PagedMeta) or meta.write_pages is None:
            raise ValueError(f"{type(self).__name__}.write_kv needs paged metadata with write_pages, "
                             f"got {type(meta).__name__}")
        kk = k_raw if (meta.cache_cos is not None and k_raw is not None) else k
        self.store(meta.pool.k[layer], meta.pool.v[layer], kk, v, meta.write_pages)

    def store(self, k_pool, v_pool, k, v, write_pages):
        reference_store_kv(k_pool, v_pool, k, v, write_pages)

    def masked(self, q, k, v, mask):  # q/k/v [B, L, H, D]; mask bool [Lq, Lk] or None
        raise NotImplementedError

    def paged(self, q, k, v, layer, meta: PagedMeta):
        # Rows may have different context lengths: run each row on its own gathered keys.
        outs = []
        for b in range(q.shape[0]):
            kc, vc = gather_context(meta, layer, b)
            kb = torch.cat([kc.to(k.dtype), k[b]], dim=0)[None]  # [1, Lc+Lq, Hkv, D]
            vb = torch.cat([vc.to(v.dtype), v[b]], dim=0)[None]
            outs.append(self.masked(q[b:b + 1], kb, vb, None))
        return torch.cat(outs, dim=0)


class ReferenceBackend(AttentionBackend):
    """Deliberately naive: explicit softmax(q k^T / sqrt(d)) v in fp32."""
    name = "reference"

    def masked(self, q, k, v, mask):
        H = q.shape[2]
        k, v = _expand_kv(k, H), _expand_kv(v, H)
        qf, kf, vf = q.float(), k.float(), v.float()
        s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) / math.sqrt(q.shape[-1])
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", p, vf).to(q.dtype)


class SDPABackend(AttentionBackend):
    name = "sdpa"

    def masked(self, q, k, v, mask):
        H = q.shape[2]
        k, v = _expand_kv(k, H), _expand_kv(v, H)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask)
        return out.transpose(1, 2)

    def paged(self, q, k, v, layer, meta):
        lens = meta.context_pages_list
        if len(set(lens)) == 1:  # equal context lengths: one batched call on the gathered pages
            n = lens[0]
            if n and _assemble_in_place(k, meta):
                return self.masked(q, *_context_and_block(k, v, layer, meta), None)
            pages = meta.block_tables[:, :n].long()
            kc = meta.pool.k[layer][pages].flatten(1, 2)  # [B, n*T, Hkv, D]
            vc = meta.pool.v[layer][pages].flatten(1, 2)
            if meta.cache_cos is not None and n:
                L = kc.shape[1]
                kc = torch_apply_rope(kc, meta.cache_cos[:, :L], meta.cache_sin[:, :L])
            return self.masked(q, torch.cat([kc.to(k.dtype), k], 1), torch.cat([vc.to(v.dtype), v], 1), None)
        return super().paged(q, k, v, layer, meta)


class FlexBackend(SDPABackend):
    """FlexAttention with a block mask for whole-clip passes; paged passes gather then run SDPA."""
    name = "flex"

    def masked(self, q, k, v, mask):
        if mask is None:
            return super().masked(q, k, v, None)
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        m = mask

        def mask_mod(b, h, qi, ki):
            return m[qi, ki]

        bm = create_block_mask(mask_mod, None, None, q.shape[1], k.shape[1], device=q.device.type)
        H = q.shape[2]
        k, v = _expand_kv(k, H), _expand_kv(v, H)
        out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm)
        return out.transpose(1, 2)


BACKENDS = {"reference": ReferenceBackend, "sdpa": SDPABackend, "flex": FlexBackend}


def get_backend(name: str | None) -> AttentionBackend:
    """Backend by name; None picks sdpa (torch fused attention over the gathered pages) on every device: on an
    H200 it measured faster end to end than the paged Triton kernel (docs/measurements.md)."""
    if name is None:
        name = "sdpa"
    if name == "triton":
        from .paged_attention import TritonBackend  # imported lazily: decorating kernels needs the env set
        return TritonBackend()
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {sorted(list(BACKENDS) + ['triton'])}")
    return BACKENDS[name]()
