"""Per-page cache groups (a model adapter's ``cache_groups``) travel with their pages: into a snapshot and back into
fresh pages of another engine, and out to the host tier and back. A group an engine does not keep is refused."""
import pytest
import torch

from inferix.engine import Engine
from inferix.models.adapter import ModelAdapter
from inferix.models.bundle import load_model
from inferix.snapshot import SnapshotError

GROUP = "extra.0"


class GroupAdapter(ModelAdapter):
    """A plain model that keeps one more per-page cache beside its K/V (as an action module does)."""

    def cache_groups(self, page_tokens: int) -> dict:
        return {GROUP: (page_tokens, 2, 4)}


def engine(groups=True, host_pages=0):
    b = load_model("tiny")
    b.decoder = None  # latents only
    if groups:
        b.adapter_class = GroupAdapter
    return Engine(b, window=6, max_sessions=2, host_pages=host_pages)


def marker(sid_tag: int, frame: int, like: torch.Tensor) -> torch.Tensor:
    """A page entry no other (session, frame) has."""
    return torch.arange(like[0].numel(), dtype=like.dtype).reshape(like.shape[1:]) + 1000 * frame + 100000 * sid_tag


def run_blocks(eng, sessions, n):
    while min(s._s.block for s in sessions) < n:
        assert eng.step()
    assert all(s.at_block_boundary for s in sessions)


def fill(eng, sess, tag):
    """Write the marker of each (session, frame) into the group rows of the session's pages; returns the frames'
    K/V of layer 0 and the markers, by frame."""
    g = eng.pool.groups[GROUP]
    want = {}
    for frame, page in eng.kv.block_table(sess.id):
        g[page] = marker(tag, frame, g)
        want[frame] = (g[page].clone(), eng.pool.k[0][page].clone(), eng.pool.v[-1][page].clone())
    assert want
    return want


def check(eng, sess, want):
    table = eng.kv.block_table(sess.id)
    assert [f for f, _ in table] == sorted(want)
    for frame, page in table:
        g, k, v = want[frame]
        assert torch.equal(eng.pool.groups[GROUP][page], g)
        assert torch.equal(eng.pool.k[0][page], k) and torch.equal(eng.pool.v[-1][page], v)
    return [p for _, p in table]


def test_groups_are_allocated_per_page_and_named():
    eng = engine()
    g = eng.pool.groups[GROUP]
    assert g.shape == (eng.kv.num_pages, eng.pool.page_tokens, 2, 4)
    assert [n for n, _ in eng.pool.page_tensors()][-1] == GROUP


def test_snapshot_carries_groups_to_fresh_pages(tmp_path):
    eng = engine()
    s = eng.open_session("a scene", num_frames=None, seed=1, init_frames=None)
    run_blocks(eng, [s], 2)
    want = fill(eng, s, 1)
    old_pages = eng.kv.held_pages(s.id)
    path = tmp_path / "s.safetensors"
    s.snapshot(path)
    other = engine()
    busy = other.open_session("another", num_frames=None, seed=2, init_frames=None)  # takes the first pages
    run_blocks(other, [busy], 1)
    r = other.restore(path)
    new_pages = check(other, r, want)
    assert set(new_pages).isdisjoint(other.kv.held_pages(busy.id)) and new_pages != old_pages
    with pytest.raises(SnapshotError, match=r"page_groups differs: snapshot \{'extra.0'.*engine \{\}$"):
        engine(groups=False).restore(path)
    plain = engine(groups=False)
    p = plain.open_session("a scene", num_frames=None, seed=1, init_frames=None)
    run_blocks(plain, [p], 1)
    p.snapshot(tmp_path / "plain.safetensors")
    with pytest.raises(SnapshotError, match="page_groups differs"):
        engine().restore(tmp_path / "plain.safetensors")


def test_host_tier_carries_groups_out_and_back():
    eng = engine(host_pages=12)
    a, b = (eng.open_session("a scene", num_frames=None, seed=s, init_frames=None) for s in (1, 2))
    run_blocks(eng, [a, b], 2)
    want = {a.id: fill(eng, a, 1), b.id: fill(eng, b, 2)}
    a.pause(), b.pause()
    c, d = (eng.open_session("a scene", num_frames=None, seed=s, init_frames=None) for s in (3, 4))
    assert a.offloaded and b.offloaded and c.status == d.status == "running"
    run_blocks(eng, [c, d], 1)
    eng.pool.groups[GROUP].zero_()  # the device copies are gone: only the host holds them now
    c.pause(), d.pause()
    a.resume(), b.resume()  # swap places with c and d
    assert not a.offloaded and not b.offloaded and c.offloaded and d.offloaded
    for s in (a, b):
        check(eng, s, want[s.id])
    for s in (a, b, c, d):
        s.cancel()
    assert eng.kv.reserved == 0 and eng.pages_in_use == 0 and eng.host.pages_used == 0
