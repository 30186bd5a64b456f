"""`inferix bench generate`: runs end to end on the embedded toy world with its own window and sink."""
import json
from pathlib import Path

import pytest
import torch

from inferix.bench import main as bench_main


@pytest.mark.slow
def test_bench_generate_toyworld_keeps_the_models_window(capsys):
    n = torch.get_num_threads()
    try:
        assert bench_main(["generate", "--preset", "toyworld", "--frames", "40", "--device", "cpu",
                           "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(n)
    r = json.loads(capsys.readouterr().out)
    meta = json.loads((Path(__file__).resolve().parent.parent / "models" / "weights" / "toyworld.json").read_text())
    assert r["preset"] == "toyworld" and r["frames"] == 40
    assert r["pixel_fps_including_decode"] > 0 and r["time_to_first_frame_s"] > 0
    # the toy world is pixel space (one latent frame per pixel frame): 40 frames outrun its window, so a
    # session never holds more pages than that window, and gives them all back
    assert r["kv_pages_max_in_use"] <= meta["window"] < 40
    assert r["kv_pages_in_use"] == 0
    assert "random" not in r["note"]
