"""The model's own rollouts as training context (self-forcing style): blocks generated the way the engine makes
them, one x0 prediction from pure noise given the cache's clean context, so that rollout batches train the DiT on
the frames it will read at inference. ``Trainer`` (train.py) swaps a clip's context for these."""
from __future__ import annotations

import torch

from ...kernels.attention import BlockCausalMeta

__all__ = ["OwnRollouts"]


class OwnRollouts:
    """Rollouts of ``dit`` for a ``TrainConfig``: ``plain`` (a window of clip_blocks blocks, no sink) and
    ``with_sink`` (the sink blocks plus the blocks generated last), both with cache-relative positions."""

    def __init__(self, dit, cfg, backend, frame_tokens: int):
        self.dit, self.cfg, self.backend, self.frame_tokens = dit, cfg, backend, frame_tokens

    @torch.no_grad()
    def _roll(self, sink, sink_acts, recent: list, recent_acts: list, new_acts: list, keep: int, text_ctx,
              g: torch.Generator) -> None:
        """Generate one block per entry of ``new_acts`` ([B, block_frames] each), as the engine makes them: one x0
        prediction from pure noise (sigma 1) given the sink frames and the last ``keep`` blocks of ``recent`` as
        clean context at ``context_timestep``, cache-relative positions 0.., clamped to [-1, 1] like the engine's
        pixel-space x0. Appends each block and its actions to ``recent`` / ``recent_acts``. The DiT's live
        weights."""
        c, dev, bf = self.cfg, sink.device, self.cfg.block_frames
        B = sink.shape[0]
        meta = BlockCausalMeta(frame_tokens=self.frame_tokens, block_frames=bf)
        for a_new in new_acts:
            noise = torch.randn((B, bf) + tuple(sink.shape[2:]), generator=g).to(dev)
            x_in = torch.cat([sink] + recent[-keep:] + [noise], dim=1)
            acts = torch.cat([sink_acts] + recent_acts[-keep:] + [a_new], dim=1)
            n_ctx = x_in.shape[1] - bf
            pos = torch.arange(x_in.shape[1], device=dev)[None].expand(B, -1)
            t_in = torch.cat([torch.full((B, n_ctx), c.context_timestep, device=dev),
                              torch.full((B, bf), 1000.0, device=dev)], dim=1)
            pred = self.dit(x_in, t_in, text_ctx, frame_pos=pos, meta=meta, backend=self.backend,
                            actions=acts)
            recent.append(pred[:, -bf:].clamp(-1, 1))
            recent_acts.append(a_new)

    def plain(self, x0_long: torch.Tensor, actions_long: torch.Tensor, text_ctx: torch.Tensor,
              g: torch.Generator) -> torch.Tensor:
        """The model's own rollout, as the engine makes it with a window of clip_blocks blocks, no sink and
        relative positions (see ``_roll``). Starts from the first clip_blocks - 1 TRUE blocks of ``x0_long``
        [B, (clip_blocks - 1 + d + 1) * block_frames, 3, H, W] with the true actions; returns the clip_blocks - 1
        blocks before the last one, [B, (clip_blocks - 1) * block_frames, 3, H, W] (generated ones where d allows).
        """
        nb, bf = self.cfg.clip_blocks, self.cfg.block_frames
        L = x0_long.shape[1]
        d = L // bf - nb
        if L % bf or d < 1:
            raise ValueError(f"rollout needs (clip_blocks + d) * block_frames frames with d >= 1, got {L}")
        block = lambda t, i: t[:, i * bf:(i + 1) * bf]
        recent = [block(x0_long, i) for i in range(nb - 1)]  # true start blocks
        recent_acts = [block(actions_long, i) for i in range(nb - 1)]
        self._roll(x0_long[:, :0], actions_long[:, :0], recent, recent_acts,
                   [block(actions_long, j) for j in range(nb - 1, nb - 1 + d)], nb - 1, text_ctx, g)
        return torch.cat(recent[-(nb - 1):], dim=1)

    def with_sink(self, x0_long: torch.Tensor, actions_long: torch.Tensor, text_ctx: torch.Tensor,
                  g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The engine's rollout with a sink (cache = sink blocks + the blocks generated last, relative positions).

        ``x0_long`` [B, S + (d + 1) * block_frames, 3, H, W] is an episode from its first frame; its first S
        (sink) frames are true, then d blocks are generated (``_roll``), each given the sink and the up to
        (clip_blocks - sink_blocks - 1) blocks generated before it, with the true actions.
        Returns (context, actions): the sink plus the last generated blocks, i.e. the clean context of the clip
        whose last block is the episode's last (true) block, and that clip's actions.
        """
        c = self.cfg
        bf, S = c.block_frames, c.sink_blocks * c.block_frames
        keep = c.clip_blocks - c.sink_blocks - 1  # generated blocks the cache keeps besides the sink
        L = x0_long.shape[1]
        d = (L - S) // bf - 1
        if (L - S) % bf or d < max(1, keep):
            raise ValueError(f"sink rollout needs {S} + (d + 1) * {bf} frames with d >= {max(1, keep)}, got {L}")
        sink, sink_acts = x0_long[:, :S], actions_long[:, :S]
        gen, gen_acts = [], []
        self._roll(sink, sink_acts, gen, gen_acts, [actions_long[:, S + j * bf:S + (j + 1) * bf] for j in range(d)],
                   keep, text_ctx, g)
        context = torch.cat([sink] + gen[-keep:], dim=1)
        actions = torch.cat([sink_acts] + gen_acts[-keep:] + [actions_long[:, -bf:]], dim=1)
        return context, actions
