"""Teacher-forcing attention: one pass over [clean clip | a noised copy of every target block].

``TeacherForcingMeta`` defines the mask (what each block may see); ``TeacherForcingBackend`` computes the same
attention block by block without building it.
"""
from __future__ import annotations

import torch

from ...kernels.attention import BlockCausalMeta, SDPABackend

__all__ = ["TeacherForcingMeta", "TeacherForcingBackend"]


class TeacherForcingMeta(BlockCausalMeta):
    """Block-causal mask over [clean blocks | a noised copy of every target block].

    Clean block i sees clean blocks <= i; the noised copy of block i sees clean blocks < i and itself. By default
    every block of the clip is a target and all clip blocks appear clean. With ``first_target`` > 0 (the sink
    layout) only blocks first_target .. num_blocks-1 are targets, and the clean copy of the last block, which no
    target reads, is left out.
    """

    def __init__(self, frame_tokens: int, block_frames: int, num_blocks: int, first_target: int = 0):
        super().__init__(frame_tokens=frame_tokens, block_frames=block_frames)
        if not 0 <= first_target < num_blocks:
            raise ValueError(f"first_target must be in [0, {num_blocks}), got {first_target}")
        self.num_blocks = num_blocks
        self.first_target = first_target
        self.clean_blocks = num_blocks if first_target == 0 else num_blocks - 1

    @property
    def total_blocks(self) -> int:
        return self.clean_blocks + self.num_blocks - self.first_target

    def _check(self, length: int) -> None:
        want = self.total_blocks * self.frame_tokens * self.block_frames
        if length != want:
            raise ValueError(f"teacher-forcing pass must have {want} tokens, got {length}")

    def mask(self, length: int, device) -> torch.Tensor:
        self._check(length)
        per_block = self.frame_tokens * self.block_frames
        nc, ft = self.clean_blocks, self.first_target
        idx = torch.arange(length, device=device) // per_block  # block slot in [0, total_blocks)
        noised = idx >= nc
        blk = torch.where(noised, idx - nc + ft, idx)  # clip block index
        q_noised, k_noised = noised[:, None], noised[None, :]
        q_blk, k_blk = blk[:, None], blk[None, :]
        clean_q = ~q_noised & ~k_noised & (k_blk <= q_blk)
        noised_q = q_noised & ((~k_noised & (k_blk < q_blk)) | (k_noised & (k_blk == q_blk)))
        return clean_q | noised_q


class TeacherForcingBackend(SDPABackend):
    """SDPA over the teacher-forcing pass without a mask: each query block attends to exactly its keys.

    Same result as masked attention with ``TeacherForcingMeta.mask`` (tested), but the many masked-out pairs
    are never computed (the masked pass costs about three times as much attention on CPU).
    """
    name = "sdpa-teacher-forcing"

    def attend(self, q, k, v, layer, meta, k_raw=None):
        if not isinstance(meta, TeacherForcingMeta):
            return super().attend(q, k, v, layer, meta, k_raw=k_raw)
        meta._check(q.shape[1])
        P = meta.frame_tokens * meta.block_frames
        nc, ft, n = meta.clean_blocks, meta.first_target, meta.num_blocks
        outs = []
        for i in range(nc):
            outs.append(self.masked(q[:, i * P:(i + 1) * P], k[:, :(i + 1) * P], v[:, :(i + 1) * P], None))
        for j, i in enumerate(range(ft, n)):
            nz = slice((nc + j) * P, (nc + j + 1) * P)
            kk = torch.cat([k[:, :i * P], k[:, nz]], dim=1)  # [B, (i+1)*P, H, D]: clean before, own noised
            vv = torch.cat([v[:, :i * P], v[:, nz]], dim=1)
            outs.append(self.masked(q[:, nz], kk, vv, None))
        return torch.cat(outs, dim=1)
