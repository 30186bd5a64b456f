"""The action corrector of a pixel-space world model: a small per-frame conv net run between the denoiser's last
estimate of a block and its commit.

A pixel-space, action-conditioned denoiser (the toy world) errs a little on every block, and the error compounds
because each block is the context of the next. ``ActionCorrector`` is trained to move the denoiser's estimate of
a frame toward a better one, given the frame before it and the action that leads into the frame. What it commits
is what later blocks attend to, so unlike the refiner (``pixel_decoder.PixelRefiner``, which only renders) its
output enters the KV cache.

Frames of a block are corrected in order: frame j sees the corrected frame j-1 as the frame before it, and frame 0
sees the stream's last committed frame (or, on a stream that has none, its own estimate). The toy world's
corrector is distilled from its mirror-view ensemble (models/toyworld/corrector_train.py): one pass of the
denoiser plus the corrector commits about what the mean of four mirrored passes would.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ActionCorrector", "corrector_from", "CORRECTOR_MODES", "use_corrector"]

# --corrector on the command lines -> the ``corrector`` argument of Engine and the engine-free eval
CORRECTOR_MODES = {"auto": None, "on": True, "off": False}


def use_corrector(requested: bool | None, model_has_one: bool, mirrors, model: str) -> bool:
    """Whether a stream runs the model's corrector: as ``requested``, or when None (auto) if the model has one and
    no mirror views run (it stands in for them: it is trained to commit what they would)."""
    if requested is None:
        return model_has_one and not mirrors
    if requested and not model_has_one:
        raise ValueError(f"corrector=True, but model {model} has no corrector")
    return bool(requested)


class ActionCorrector(nn.Module):
    """out = est + f(est, prev, one-hot action) for frames [N, 3, H, W] in [-1, 1], clamped to [-1, 1].

    f: ``layers`` 3x3 convs, ``channels`` wide, GELU between; its input stacks the estimate, the frame before it
    and the action as ``actions`` constant planes. The last conv starts at zero, so an untrained corrector is the
    identity (up to the clamp)."""

    def __init__(self, channels: int = 32, layers: int = 6, actions: int = 5):
        super().__init__()
        if channels < 1 or layers < 2 or actions < 1:
            raise ValueError(f"a corrector needs channels >= 1, layers >= 2 and actions >= 1, got channels={channels} "
                             f"layers={layers} actions={actions}")
        self.channels, self.layers, self.actions = int(channels), int(layers), int(actions)
        convs = [nn.Conv2d(3 + 3 + actions, channels, 3, padding=1)]
        convs += [nn.Conv2d(channels, channels, 3, padding=1) for _ in range(layers - 2)]
        self.convs = nn.ModuleList(convs)
        self.out = nn.Conv2d(channels, 3, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def config(self) -> dict:
        return {"type": "action", "channels": self.channels, "layers": self.layers, "actions": self.actions}

    def _checked(self, est: torch.Tensor, prev: torch.Tensor, action) -> torch.Tensor:
        """Shapes and action ids checked (one host sync for the ids); the ids as a long tensor on est's device."""
        if est.dim() != 4 or est.shape[1] != 3 or prev.shape[-3:] != est.shape[-3:]:
            raise ValueError(f"the corrector takes est and prev frames [N, 3, H, W] of one shape, got "
                             f"{tuple(est.shape)} and {tuple(prev.shape)}")
        action = torch.as_tensor(action, device=est.device).long().reshape(-1)
        if action.shape[0] != est.shape[0]:
            raise ValueError(f"the corrector needs one action per frame: {est.shape[0]} frames, "
                             f"{action.shape[0]} actions")
        if action.numel() and not (0 <= int(action.min()) and int(action.max()) < self.actions):
            raise ValueError(f"action ids must lie in 0..{self.actions - 1}, got {action.tolist()}")
        return action

    def forward(self, est: torch.Tensor, prev: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """est, prev [N, 3, H, W]; action ids [N] -> corrected est [N, 3, H, W]."""
        if prev.shape != est.shape:
            raise ValueError(f"the corrector takes est and prev frames [N, 3, H, W] of one shape, got "
                             f"{tuple(est.shape)} and {tuple(prev.shape)}")
        return self._correct(est, prev, self._checked(est, prev, action))

    def _correct(self, est, prev, action):  # forward without its checks
        a = F.one_hot(action, self.actions).to(est.dtype)[:, :, None, None].expand(-1, -1, *est.shape[2:])
        h = torch.cat([est, prev, a], 1)
        for conv in self.convs:
            h = F.gelu(conv(h))
        return (est + self.out(h)).clamp(-1, 1)

    def block(self, est: torch.Tensor, prev: torch.Tensor | None, actions) -> torch.Tensor:
        """A block's estimate [F, 3, H, W] corrected frame by frame, each after the corrected one before it; prev
        [3, H, W]: the frame committed before the block (None: the block's own first estimate stands in)."""
        return self.blocks(est[None], [prev], torch.as_tensor(actions).reshape(1, -1))[0]

    def blocks(self, est: torch.Tensor, prevs: list, actions) -> torch.Tensor:
        """``block`` for several streams at once: est [N, F, 3, H, W], prevs one frame [3, H, W] or None per
        stream, actions ids [N, F]; frame j of every stream is corrected in one pass."""
        if est.dim() != 5 or len(prevs) != est.shape[0]:
            raise ValueError(f"blocks takes est [N, F, 3, H, W] and one prev per stream, got {tuple(est.shape)} "
                             f"and {len(prevs)} prevs")
        N, F = est.shape[:2]
        last = torch.stack([(est[i, 0] if p is None else p).to(est.dtype) for i, p in enumerate(prevs)])
        actions = torch.as_tensor(actions, device=est.device).long()
        if actions.shape != (N, F):
            raise ValueError(f"the corrector needs one action per frame: {N * F} frames ({N} streams of {F}), "
                             f"{actions.numel()} actions shaped {tuple(actions.shape)}")
        # checked once per call, not per frame: each check is a host sync on a GPU
        actions = self._checked(est.flatten(0, 1), last, actions.reshape(-1)).view(N, F)
        outs = []
        with torch.no_grad():
            for j in range(F):
                last = self._correct(est[:, j], last, actions[:, j])
                outs.append(last)
        return torch.stack(outs, 1)


def corrector_from(meta: dict, sd: dict, source, num_actions: int) -> ActionCorrector | None:
    """The bundle's corrector: ``"corrector": {"type": "action", "channels": C, "layers": L, "actions": A}`` with
    the ``corrector.`` tensors of the bundle's safetensors; None when the bundle has none."""
    from .tensor_files import load_prefixed_strict
    c = meta.get("corrector")
    if c is None:
        return None
    if not isinstance(c, dict) or c.get("type") != "action":
        raise ValueError(f"{source}: corrector must be {{'type': 'action', ...}}, got {c!r}")
    try:
        corr = ActionCorrector(int(c["channels"]), int(c["layers"]), int(c["actions"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: corrector must give integer 'channels', 'layers' and 'actions', got {c!r}") from e
    if corr.actions != num_actions:
        raise ValueError(f"{source}: the corrector takes {corr.actions} actions, the DiT {num_actions}")
    load_prefixed_strict(corr, sd, "corrector.", source)
    return corr.eval()
