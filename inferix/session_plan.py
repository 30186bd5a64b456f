"""What a new session will do, worked out from the request alone: plain ints, lists and dicts, no torch.

``plan_session`` turns the user's counts into the scheduler's: pixel frames into latent frames and blocks, the
KV pages the session reserves, the chunks its given frames are prefilled in, one action per latent frame from one
per pixel frame, and a prompt schedule (by pixel frame) into the prompt each block starts with. It checks the
request as it goes and raises before anything is reserved.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable

from .pages import AdmissionError, budget_for, check_fits_ever
from .sizing import pixel_to_latent, session_span

__all__ = ["SessionPlan", "plan_session"]


@dataclass(frozen=True)
class SessionPlan:
    prompt: str  # the prompt the first generated block uses
    total_blocks: int | None  # generated blocks (None: until cancelled)
    total_latent: int | None  # latent frames committed in all: given context + generated (None: until cancelled)
    first_block_frames: int  # 1 when the first generated frame is a block of its own, else 0
    budget: int  # KV pages reserved
    prefill_chunks: list = field(default_factory=list)  # sizes of the prefill passes over the given frames
    action_plan: dict = field(default_factory=dict)  # absolute latent frame -> action id
    prompt_plan: dict = field(default_factory=dict)  # generated block index -> prompt it switches to


def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Integral)


def _last(items: list):
    return items[-1]


def plan_session(bundle, *, prompt: str, num_frames: int | None, n_init: int, window: int | None, pool_pages: int,
                 actions=None, action_id: Callable | None = None, prompt_schedule=None,
                 latent_condition: Callable | None = None) -> SessionPlan:
    """The plan of a session that delivers num_frames pixel frames (None: until cancelled) after n_init given
    latent frames, in an engine with this window (latent frames, None: none) over a pool of pool_pages pages.

    bundle: anything with ``sampling.block_frames``, ``sampling.independent_first_frame``, ``latent_frames(n)``
    and ``pixel_frames(n)`` (a ModelBundle). actions: one per output pixel frame, each made an id by action_id
    (default: taken as given); latent_condition makes one latent frame's condition from the actions of the pixel
    frames it shows (default: the last one's).
    prompt_schedule: (pixel frame, prompt) pairs; frame f switches at generated block latent(f + 1) // block_frames,
    latent(n) being the latent frames that show n pixel frames (block 0: the prompt the session starts with).
    """
    bf = bundle.sampling.block_frames
    independent_first = bool(bundle.sampling.independent_first_frame)
    first = 1 if (independent_first and not n_init) else 0
    total_blocks = total_latent = None
    if num_frames is not None:
        span = session_span(bundle, int(num_frames), n_init)
        total_blocks, total_latent = span.total_blocks, span.total_latent
    if window is None and total_latent is None:
        raise AdmissionError("a session without num_frames runs until cancelled and needs a window "
                             "(Engine(window=...)) to keep its KV cache bounded")
    budget = budget_for(window, total_latent)
    check_fits_ever(budget, pool_pages, window)
    action_plan = {}
    if latent_condition is None:
        latent_condition = _last
    if actions is not None:
        if isinstance(actions, (str, bytes)) or not hasattr(actions, "__len__") or not len(actions):
            raise ValueError(f"actions must be a non-empty list (one per output frame), got {actions!r}")
        acts = list(actions) if action_id is None else [action_id(a) for a in actions]
        # one action per pixel frame -> one condition per latent frame, from the pixel frames it shows (the last
        # given action held past the end)
        last = len(acts) - 1
        spans = [range(bundle.pixel_frames(i), bundle.pixel_frames(i + 1))
                 for i in range(pixel_to_latent(bundle, len(acts)))]
        lat = [latent_condition([acts[min(last, p)] for p in span]) for span in spans]
        action_plan = {n_init + i: a for i, a in enumerate(lat)}
    start_prompt, prompt_plan = prompt, {}
    for frame, p in (prompt_schedule or ()):
        if not _is_int(frame) or frame < 0:
            raise ValueError(f"prompt_schedule frames must be ints >= 0, got {frame!r}")
        if not isinstance(p, str):
            raise TypeError(f"prompt_schedule prompts must be str, got {type(p).__name__}")
        blk = pixel_to_latent(bundle, int(frame) + 1) // bf if frame > 0 else 0
        if blk == 0:
            start_prompt = p
        else:
            prompt_plan[blk] = p
    chunks = []
    if n_init:
        lead = [1] if independent_first else []
        chunks = lead + [min(bf, n_init - i) for i in range(len(lead), n_init, bf)]
    return SessionPlan(prompt=start_prompt, total_blocks=total_blocks, total_latent=total_latent,
                       first_block_frames=first, budget=budget, prefill_chunks=chunks, action_plan=action_plan,
                       prompt_plan=prompt_plan)
