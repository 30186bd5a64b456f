"""Plain-data plan of one engine step (no tensors): which rows run which pass. It can be logged and replayed."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Row", "Group", "StepPlan", "DENOISE", "COMMIT", "PREFILL", "RECACHE"]

DENOISE = "denoise"  # one denoising step of a block; reads the cache
COMMIT = "commit"  # the clean block at the context timestep; writes its K/V into fresh pages
PREFILL = "prefill"  # given context frames (image/video start) at the context timestep; writes pages
RECACHE = "recache"  # re-commit the visible window under a new prompt; writes (copy-on-write) pages


@dataclass(kw_only=True)
class Row:
    """One session's pass in a step. Built by keyword only: its fields are many and mostly ints."""
    sid: int
    kind: str
    step: int  # denoising step (DENOISE); 0 otherwise
    block: int  # index of the generated block this row belongs to
    frame_start: int  # absolute latent-frame index of the row's first frame
    nframes: int
    context_pages: list = field(default_factory=list)  # pages read, in order (sink, then window)
    context_frames: list = field(default_factory=list)  # absolute frame index of each context page
    write_pages: list | None = None  # pages this pass fills (COMMIT / PREFILL / RECACHE)
    prompt: str | None = None  # set on the row where a new prompt takes effect
    actions: list | None = None  # per-frame conditions of the block (world models: action ids, or what the model
    # adapter's latent_condition makes of keyboard and mouse input); opaque here
    past_actions: list | None = None  # conditions of the latent frames just before the block, oldest first (as
    # many as the model adapter's condition_history asks for, fewer at the start of a stream)
    last_step: bool = False  # DENOISE: the block is clean after this step (decode it)
    gen_start: int = 0  # index of the row's first frame among the generated frames (given context excluded)


@dataclass
class Group:
    """Rows run in one forward pass: same kind and same number of frames."""
    kind: str
    nframes: int
    rows: list


@dataclass
class StepPlan:
    groups: list = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.groups

    def rows(self):
        for g in self.groups:
            yield from g.rows
