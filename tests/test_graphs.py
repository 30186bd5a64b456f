"""Whole-pass CUDA graphs (inferix/graphs.py), checked on the CPU in emulation: every steady-state pass runs
through the static buffers that a captured graph would read, refilled in place (latents, timesteps, rolled page
ids, RoPE tables, actions, text K/V), and must give exactly what the plain path gives."""
import pytest
import torch

from engine_utils import tiny_engine
from inferix.graphs import PassGraphs


def stream_latents(eng, graphs: bool, n_frames=45, seeds=(0,), actions=None):
    if graphs:
        eng.runner.graphs = PassGraphs(eng.dit, eng.device, warmup=1, emulate=True)
    sess = [eng.open_session(f"a red ball {i}", num_frames=n_frames, seed=s, actions=actions)
            for i, s in enumerate(seeds)]
    while not all(s.done for s in sess):
        eng.step()
        for s in sess:
            s.poll()
    return [torch.cat(s.latents) for s in sess]


@pytest.mark.parametrize("positions", ["relative", "absolute"])
def test_static_buffer_passes_equal_the_plain_passes(positions):
    kw = dict(window=6, sink=3, kv_pages=24, positions=positions, num_actions=4)
    acts = [0, 1, 2, 3, 1, 2] * 8
    plain = stream_latents(tiny_engine(**kw), False, seeds=(0, 1), actions=acts)
    eng = tiny_engine(**kw)
    got = stream_latents(eng, True, seeds=(0, 1), actions=acts)
    g = eng.runner.graphs
    assert g.captures >= 2 and g.replays >= 10  # denoise and commit passes of the rolled window repeat
    for a, b in zip(plain, got):
        assert torch.equal(a, b)
    assert eng.stats()["cuda_graphs"] == {"captured": g.captures, "replays": g.replays}


def test_a_growing_context_never_captures():
    eng = tiny_engine(window=None, kv_pages=64)
    stream_latents(eng, True, n_frames=30)  # global attention: every block sees a longer context
    assert eng.runner.graphs.captures == 0 and eng.runner.graphs.replays == 0


def test_cuda_graphs_need_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the message on a machine without CUDA")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        tiny_engine(window=6, kv_pages=12, cuda_graphs=True)
