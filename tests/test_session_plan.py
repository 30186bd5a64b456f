"""plan_session: a request's counts turned into the scheduler's, on plain ints (no torch, no model).

The expected figures are worked out by hand from a Wan-like codec (the first latent frame decodes to 1 pixel frame,
every later one to 4) or an identity codec (1 latent frame = 1 pixel frame).
"""
from types import SimpleNamespace

import numpy as np
import pytest

from inferix.pages import AdmissionError
from inferix.session_plan import SessionPlan, plan_session


def wan_like(block_frames=3, independent_first_frame=False):
    return SimpleNamespace(
        sampling=SimpleNamespace(block_frames=block_frames, independent_first_frame=independent_first_frame),
        pixel_frames=lambda n: 0 if n == 0 else 1 + 4 * (n - 1),
        latent_frames=lambda p: 1 + (p - 1) // 4)


def identity(block_frames=3, independent_first_frame=False):
    return SimpleNamespace(
        sampling=SimpleNamespace(block_frames=block_frames, independent_first_frame=independent_first_frame),
        pixel_frames=lambda n: n, latent_frames=lambda p: p)


def plan(bundle, **kw):
    args = dict(prompt="p", num_frames=None, n_init=0, window=None, pool_pages=64)
    args.update(kw)
    return plan_session(bundle, **args)


def test_frames_to_blocks_and_budget():
    # 33 pixel frames = 9 latent frames = 3 blocks of 3; no window: every frame is kept
    assert plan(wan_like(), num_frames=33) == SessionPlan(prompt="p", total_blocks=3, total_latent=9,
                                                          first_block_frames=0, budget=9)
    # 34 pixel frames need 10 latent frames (9 decode to 33): 4 blocks, 12 latent frames made; a window of 7
    p = plan(wan_like(), num_frames=34, window=7)
    assert (p.total_blocks, p.total_latent, p.budget) == (4, 12, 7)
    # a window larger than the session: the session's own frames bound it
    assert plan(wan_like(), num_frames=33, window=20).budget == 9
    # identity codec, blocks of 4: 10 frames -> 3 blocks, 12 latent frames
    p = plan(identity(block_frames=4), num_frames=10)
    assert (p.total_blocks, p.total_latent, p.budget) == (3, 12, 12)


def test_until_cancelled_needs_a_window():
    p = plan(wan_like(), window=6)
    assert (p.total_blocks, p.total_latent, p.budget) == (None, None, 6)
    with pytest.raises(AdmissionError, match="needs a window"):
        plan(wan_like())


def test_a_budget_the_pool_never_holds_is_refused():
    with pytest.raises(AdmissionError, match="needs 12 KV pages .* pool has only 10"):
        plan(wan_like(), num_frames=34, pool_pages=10)
    with pytest.raises(AdmissionError, match="its window.*or lower the window"):
        plan(wan_like(), window=12, pool_pages=10)
    assert plan(wan_like(), num_frames=34, pool_pages=12).budget == 12


def test_independent_first_frame():
    # 17 pixel frames = 5 latent frames: the first is a block of its own, then 4 frames in 2 blocks of 3
    p = plan(wan_like(independent_first_frame=True), num_frames=17)
    assert (p.total_blocks, p.total_latent, p.first_block_frames, p.prefill_chunks) == (3, 7, 1, [])
    # after given frames there is no independent first block; the first given frame is prefilled alone
    p = plan(wan_like(independent_first_frame=True), num_frames=9, n_init=4)
    assert (p.total_blocks, p.total_latent, p.first_block_frames, p.prefill_chunks) == (1, 7, 0, [1, 3])


def test_prefill_chunks():
    assert plan(wan_like(), num_frames=9, n_init=5).prefill_chunks == [3, 2]
    assert plan(wan_like(), num_frames=9, n_init=6).prefill_chunks == [3, 3]
    assert plan(wan_like(), num_frames=9, n_init=1).prefill_chunks == [1]
    assert plan(wan_like(), num_frames=9).prefill_chunks == []
    p = plan(wan_like(), num_frames=9, n_init=5)
    assert (p.total_blocks, p.total_latent) == (1, 8)  # given frames count toward the pages kept


def test_actions_per_pixel_frame_become_actions_per_latent_frame():
    # 6 pixel frames need 3 latent frames; latent frame i takes the action of the last pixel frame it shows
    # (pixel frames 0, 4 and 8, clamped to the last one given, 5), numbered after the 2 given latent frames
    p = plan(wan_like(), num_frames=6, n_init=2, actions=[10, 11, 12, 13, 14, 15])
    assert p.action_plan == {2: 10, 3: 14, 4: 15}
    names = ["up", "down"]
    p = plan(identity(), num_frames=3, actions=["up", "down", "down"], action_id=names.index)
    assert p.action_plan == {0: 0, 1: 1, 2: 1}
    assert plan(identity(), num_frames=3).action_plan == {}


@pytest.mark.parametrize("bad", ["up", b"up", [], (), 5])
def test_bad_actions(bad):
    with pytest.raises(ValueError, match="actions must be a non-empty list"):
        plan(identity(), num_frames=3, actions=bad)


def test_action_id_errors_pass_through():
    def action_id(a):
        raise ValueError(f"unknown action {a!r}")
    with pytest.raises(ValueError, match="unknown action 'jump'"):
        plan(identity(), num_frames=3, actions=["jump"], action_id=action_id)


def test_prompt_schedule_to_block_prompts():
    # pixel frame f switches at block latent(f + 1) // 3, where latent(n) is the latent frames showing n pixel
    # frames: f=9 -> 4 // 3 = 1, f=20 -> 6 // 3 = 2, f=1 -> 2 // 3 = 0 (the start prompt; the later entry wins)
    p = plan(wan_like(), num_frames=33, prompt_schedule=[(0, "a"), (9, "b"), (20, "c"), (1, "d")])
    assert (p.prompt, p.prompt_plan) == ("d", {1: "b", 2: "c"})
    p = plan(identity(), num_frames=12, prompt_schedule=[(np.int64(2), "x"), (5, "y"), (6, "z")])
    assert (p.prompt, p.prompt_plan) == ("p", {1: "x", 2: "z"})  # 5 and 6 both land on block 2: the later wins
    assert plan(wan_like(), num_frames=33).prompt_plan == {}


@pytest.mark.parametrize("entry,err,match", [
    ((-1, "a"), ValueError, "frames must be ints >= 0"),
    ((True, "a"), ValueError, "frames must be ints >= 0"),
    ((np.bool_(True), "a"), ValueError, "frames must be ints >= 0"),
    ((1.0, "a"), ValueError, "frames must be ints >= 0"),
    ((3, 7), TypeError, "prompts must be str, got int"),
])
def test_bad_prompt_schedule(entry, err, match):
    with pytest.raises(err, match=match):
        plan(identity(), num_frames=12, prompt_schedule=[entry])


def test_admission_is_checked_before_actions_and_schedule():
    with pytest.raises(AdmissionError):
        plan(identity(), actions="bad", prompt_schedule=[(-1, "a")])


def test_inputs_are_not_changed():
    acts, sched = [1, 2, 3], [(0, "a"), (4, "b")]
    plan(identity(), num_frames=3, actions=acts, prompt_schedule=sched)
    assert acts == [1, 2, 3] and sched == [(0, "a"), (4, "b")]
