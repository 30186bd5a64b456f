import numpy as np
import pytest

from inferix.lvbench.groundtruth import PSNR_CAP_DB, ground_truth_drift, load_hook, psnr


def test_psnr_and_position_error_per_chunk():
    rng = np.random.default_rng(0)
    t, n = 20, 4
    gt = rng.integers(0, 256, (t, 16, 16, 3), dtype=np.uint8)
    # generated frames drift: noise amplitude grows with time
    amp = np.repeat(np.arange(n) * 4 + 2, t // n)
    gen = np.clip(gt.astype(int) + rng.choice([-1, 1], gt.shape) * amp[:, None, None, None], 0, 255).astype(np.uint8)
    gt_pos = rng.uniform(0, 16, (t, 2))
    pred_pos = gt_pos + np.stack([np.arange(t) * 0.5, np.zeros(t)], 1)  # x error grows 0.5 per frame
    out = ground_truth_drift(gen, gt, gt_pos, pred_pos, num_chunks=n)
    # naive PSNR per frame, then mean per chunk
    ref = []
    for a, b in zip(gen.astype(float), gt.astype(float)):
        ref.append(10 * np.log10(255**2 / np.mean((a - b) ** 2)))
    ref_chunks = [np.mean(ref[k * 5:(k + 1) * 5]) for k in range(n)]
    assert out["chunk_psnr"] == pytest.approx(ref_chunks)
    assert all(a > b for a, b in zip(out["chunk_psnr"], out["chunk_psnr"][1:]))  # PSNR falls as noise grows
    assert out["psnr_vde"] > 0
    assert out["chunk_position_error"] == pytest.approx([np.mean(np.arange(k * 5, k * 5 + 5) * 0.5) for k in range(n)])
    assert out["final_position_error"] == pytest.approx(out["chunk_position_error"][-1])


def test_identical_frames_cap_and_locate_and_multi_agent():
    gt = np.zeros((4, 8, 8, 3), np.uint8)
    assert psnr(gt, gt).tolist() == [PSNR_CAP_DB] * 4
    pos = np.zeros((4, 3, 2))  # 3 agents
    out = ground_truth_drift(gt, gt, pos, locate=lambda fr: np.ones((len(fr), 3, 2)), num_chunks=2)
    assert out["chunk_position_error"] == pytest.approx([np.sqrt(2)] * 2)
    assert out["psnr_vde"] == 0.0


def test_errors_name_the_problem():
    a = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="differ in shape"):
        ground_truth_drift(a, np.zeros((4, 8, 6, 3), np.uint8), num_chunks=2)
    with pytest.raises(ValueError, match="pred_positions or a locate"):
        ground_truth_drift(a, a, np.zeros((4, 2)), num_chunks=2)
    with pytest.raises(ValueError, match="fewer than num_chunks"):
        ground_truth_drift(a, a, num_chunks=5)
    with pytest.raises(ValueError, match="module:function"):
        load_hook("nocolon")
    with pytest.raises(ValueError, match="no callable"):
        load_hook("math:nothing_here")
    assert load_hook("math:sqrt")(4) == 2
