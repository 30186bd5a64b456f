"""torch.compile of the DiT's fixed-shape parts (Engine(compile=...)): numerics within 1e-5 of eager, no new
graphs in a steady stream (the paged attention, whose context grows and rolls, stays outside the graphs), and
eager again bit for bit after compile_blocks(None)."""
import pytest
import torch

from engine_utils import tiny_engine
from inferix.profiling import compiled_graphs

pytestmark = pytest.mark.slow  # the first blocks pay Inductor's compile time


def latents(eng, n_frames=30, seed=0):
    s = eng.open_session("a red ball", num_frames=n_frames, seed=seed)
    for _ in s:
        pass
    return torch.cat(s.latents)


def test_compiled_blocks_match_eager_and_build_no_graphs_in_a_steady_stream():
    eager = latents(tiny_engine(window=6, kv_pages=12, seed=3))
    before = compiled_graphs()
    eng = tiny_engine(window=6, kv_pages=12, seed=3, compile="default")
    assert eng.dit.blocks[0].before_attention is not eng.dit.blocks[0].qkv
    got = latents(eng)  # 10 blocks: the window fills after 2 and then rolls
    assert got.shape == eager.shape
    assert (got - eager).abs().max().item() <= 1e-5
    built = compiled_graphs()
    again = latents(eng, n_frames=60, seed=1)  # 20 more blocks of the same batch and block size
    assert compiled_graphs() == built, "a steady stream must not build new graphs"
    st = eng.stats()
    assert st["compile"] == "default" and st["compiled_graphs"] == built - before > 0
    eng.dit.compile_blocks(None)
    assert eng.dit.blocks[0].before_attention == eng.dit.blocks[0].qkv
    torch.testing.assert_close(latents(eng, n_frames=60, seed=1), again, atol=1e-5, rtol=0)
    plain = tiny_engine(window=6, kv_pages=12, seed=3)
    assert torch.equal(latents(eng), latents(plain))  # back to eager: bit for bit


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="compile must be one of"):
        tiny_engine(window=6, kv_pages=12, compile="fastest")
