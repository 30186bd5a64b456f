"""Toy world without a model: the simulator's rules and the evaluation metrics and pictures."""
import math

import numpy as np
import pytest

from inferix.models.toyworld import simulator as sim
from inferix.models.toyworld.metrics import (detect_color, drift_curve_png, palette_share, psnr, rollout_metrics,
                                             strip_png)


def test_simulator_is_deterministic_and_seed_dependent():
    a, pa = sim.simulate(5, None, "desert", 20)
    b, pb = sim.simulate(5, None, "desert", 20)
    c, _ = sim.simulate(6, None, "desert", 20)
    assert a.dtype == np.uint8 and a.shape == (20, 64, 64, 3) and pa.shape == (20, 2)
    assert np.array_equal(a, b) and np.array_equal(pa, pb)
    assert not np.array_equal(a, c)


def test_agent_moves_two_pixels_per_action_and_stops_at_the_wall():
    acts = ["right"] * 3 + ["down"] * 2 + ["none"] * 2 + ["left"] * 60 + ["up"] * 60
    world = sim.World(1, "")
    x, y = world.agent_center()
    lo, hi = sim.WALL + sim.AGENT_SIZE / 2, sim.SIZE - sim.WALL - sim.AGENT_SIZE / 2
    step = {"none": (0, 0), "up": (0, -2), "down": (0, 2), "left": (-2, 0), "right": (2, 0)}
    for a in acts:
        _, p = world.step(sim.ACTIONS.index(a))
        x, y = min(max(x + step[a][0], lo), hi), min(max(y + step[a][1], lo), hi)
        assert tuple(p) == (x, y), a
    assert (x, y) == (lo, lo)  # held left and up: flush in the top-left corner


def test_agent_position_is_exactly_found_by_colour():
    frames, pos = sim.simulate(3, None, "night", 40)
    assert np.allclose(detect_color(frames, sim.AGENT_COLOR), pos)


def test_ball_stays_inside_and_bounces():
    world = sim.World(11, "snow")
    flips, v_prev = 0, world.ball_v.copy()
    for _ in range(200):
        world.step(0)
        assert sim.WALL <= world.ball.min() and world.ball.max() <= sim.SIZE - sim.WALL - sim.BALL_DIAMETER
        flips += int((np.sign(world.ball_v) != np.sign(v_prev)).any())
        v_prev = world.ball_v.copy()
    assert flips >= 2


def test_ball_path_predicts_the_ball_without_moving_it():
    world = sim.World(5, "desert")
    before = (world.ball.copy(), world.ball_v.copy(), world.agent.copy())
    path, bounced = world.ball_path(120)
    assert all(np.array_equal(a, b) for a, b in zip(before, (world.ball, world.ball_v, world.agent)))
    v_prev = world.ball_v.copy()
    for t in range(120):
        world.step(int(t % 5))
        assert np.array_equal(world.ball, path[t])
        assert bounced[t] == (world.ball_v != v_prev).any()
        v_prev = world.ball_v.copy()
    assert bounced.sum() >= 2


def test_scene_is_static_and_every_pixel_is_a_palette_colour():
    frames, _, bg = sim.simulate(9, None, "a snowy field", 30, return_background=True)
    moving = (frames != bg[None]).any(-1)  # [T, H, W]
    assert moving.mean() < 0.05  # only the agent (36 px) and the ball (<= 64 px) differ from the scene
    pal = sim.palette("snow")
    d = np.abs(frames[..., None, :].astype(int) - pal.astype(int)).sum(-1).min(-1)
    assert d.max() == 0
    assert palette_share(frames, pal, tol=0.5).min() == 1.0


def test_prompt_selects_theme():
    assert sim.theme_of("A cube in the SNOWY woods") == "snow"  # the first theme word wins
    assert sim.theme_of("desert at night") == "desert"
    assert sim.theme_of("nothing here") == sim.DEFAULT_THEME
    night, _ = sim.simulate(2, None, "night", 1)
    day, _ = sim.simulate(2, None, "meadow", 1)
    assert night.mean() < day.mean() - 50
    with pytest.raises(ValueError, match="unknown action"):
        sim.simulate(0, ["jump"], "", 1)
    with pytest.raises(ValueError, match="need one action per frame"):
        sim.simulate(0, [1, 2], "", 3)


# ---- metrics and pictures -----------------------------------------------------------------------
def test_rollout_metrics_on_truth_and_on_a_frozen_copy():
    frames, pos = sim.simulate(21, None, "meadow", 140)
    ctx, true, tpos = frames[:8], frames[8:], pos[8:]
    m = rollout_metrics(true, true, tpos, ctx)["summary"]
    assert m["agent_error_median_px"] == 0.0 and m["agent_found_share"] == 1.0
    assert m["palette_share_min_window"] == 1.0
    frozen = np.repeat(ctx[-1:], len(true), 0)
    f = rollout_metrics(frozen, true, tpos, ctx)
    assert np.allclose(f["per_frame"]["psnr"], f["per_frame"]["psnr_copy_last"])
    assert not f["summary"]["targets"]["psnr_beats_baselines_every_32_of_first_256"]
    blank = np.zeros_like(true)
    b = rollout_metrics(blank, true, tpos, ctx)["summary"]
    assert b["agent_found_share"] == 0.0 and math.isinf(b["agent_error_median_px"])
    assert psnr(true[:1], true[:1])[0] > 90


def test_pictures(tmp_path):
    frames, pos = sim.simulate(2, None, "snow", 40)
    m = rollout_metrics(frames[8:], frames[8:], pos[8:], frames[:8])
    p = drift_curve_png(m, tmp_path / "d.png")
    s = strip_png([("truth", frames), ("again", frames)], [0, 5, 39], tmp_path / "s.png")
    from PIL import Image
    assert Image.open(p).size[0] == 900
    assert Image.open(s).size == (70 + 3 * 130, 14 + 2 * 130)
