"""``inferix bench serve`` against the real server of the ``server`` fixture: the JSON's keys and sane values
(no timing thresholds)."""
from __future__ import annotations

import json

from inferix.bench_serve import main, summarize_metrics


def _check(r: dict, clients: int, blocks: int) -> None:
    assert r["benchmark"] == "serve" and r["clients"] == clients and r["errors"] == []
    assert r["frame_shape"] == [64, 64, 3]
    t = r["time_to_first_frame_s"]
    assert t["n"] == clients and 0 < t["p50"] <= t["p95"]
    fps = r["delivered_fps_per_session"]
    assert 0 < fps["min"] <= fps["mean"]
    assert r["aggregate_fps"] > 0 and r["frames_total"] >= clients * blocks * 4
    assert r["kv_pages_used_after"] == 0
    for k in ("time_to_first_frame_s", "delivered_fps_per_session", "aggregate_fps", "control_to_applied_s"):
        assert isinstance(r["includes"][k], str) and r["includes"][k]


def test_bench_serve_two_clients_with_actions(server, capsys):
    assert main(["--url", server, "--clients", "2", "--blocks", "5", "--actions", "--video", "jpeg"]) == 0
    r = json.loads(capsys.readouterr().out)
    _check(r, 2, 5)
    c = r["control_to_applied_s"]
    assert c["n"] >= 2 and 0 < c["p50"] <= c["p95"]
    assert c["blocks_after_sent_block"]["min"] >= 0
    hist = r["server_metrics"]
    assert hist["inferix_time_to_first_frame_seconds"]["count"] >= 2


def test_bench_serve_fmp4_no_actions(server, capsys):
    assert main(["--url", server, "--clients", "2", "--blocks", "3", "--video", "fmp4"]) == 0
    r = json.loads(capsys.readouterr().out)
    _check(r, 2, 3)
    assert r["control_to_applied_s"]["n"] == 0 and r["control_to_applied_s"]["p50"] is None


def test_summarize_metrics():
    text = "\n".join([
        "# TYPE inferix_block_latency_seconds histogram",
        'inferix_block_latency_seconds_bucket{le="0.1"} 2',
        'inferix_block_latency_seconds_bucket{le="0.2"} 8',
        'inferix_block_latency_seconds_bucket{le="+Inf"} 10',
        "inferix_block_latency_seconds_sum 1.5",
        "inferix_block_latency_seconds_count 10",
        'inferix_sessions{state="running"} 3',
    ])
    s = summarize_metrics(text)
    h = s["histograms"]["inferix_block_latency_seconds"]
    assert h["count"] == 10 and abs(h["mean_s"] - 0.15) < 1e-9
    assert 0.1 < h["p50_s"] < 0.2 and h["p95_s"] == 0.2
    assert s["values"]['inferix_sessions{state="running"}'] == 3
