"""The attention benchmark runs (CPU variant here) and prints well-formed JSON with its FLOP formula."""
import json

import torch

from inferix import bench_attention


def test_cpu_variant_prints_json(capsys):
    threads = torch.get_num_threads()
    try:
        assert bench_attention.main(["--cpu", "--iters", "2"]) == 0
    finally:
        torch.set_num_threads(threads)
    r = json.loads(capsys.readouterr().out)
    assert r["device"] == "cpu" and "no CUDA" in r["note"]
    assert r["flop_formula"].startswith("4 * B * H * Lq * Lk * D")
    assert [row["lk"] for row in r["rows"]] == [48, 96, 144]
    for row in r["rows"]:
        assert row["reference"]["ms"] > 0 and row["sdpa"]["tflops"] > 0
        assert row["max_abs_diff_reference_vs_sdpa"] < 1e-5


def test_default_sweep_covers_self_forcing_cache():
    a = bench_attention.parse_args([])
    assert a.lk[0] == 4680 and a.lk[-1] == 32760 and a.lq == 4680
    assert (a.heads, a.head_dim, a.dtype, a.page_tokens) == (12, 128, "bfloat16", 1560)
