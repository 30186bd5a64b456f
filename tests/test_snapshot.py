"""Session snapshots: a stream saved at a block boundary continues bit for bit after a restore, in this process or
another one; a snapshot that does not fit the engine, or a damaged one, is refused before any page is reserved."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from inferix.engine import AdmissionError, Engine
from inferix.models.bundle import load_model
from inferix.runner import RecordedNoise
from inferix.snapshot import HEADER_KEY, SUM_KEY, SnapshotError, _Writer, model_identity

ROOT = Path(__file__).resolve().parents[1]
ACTIONS = ["up", "right", "right", "down", "left", "none", "down", "down"] * 12

# Restores a snapshot in a fresh process and writes the next blocks' frames to an .npy file.
CHILD = """
import sys
import numpy as np
from inferix.engine import Engine
from inferix.models.bundle import load_model
kind, snap, out, m = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
eng = Engine(load_model("tiny"), window=6, max_sessions=2) if kind == "tiny" else \\
    Engine.from_pretrained("toyworld", max_sessions=2)
s = eng.restore(snap)
assert s.status == "paused", s.status
s.resume()
got = []
while len(got) < m:
    eng.step()
    got.extend(s.poll())
np.save(out, np.stack(got[:m]))
"""


def tiny_engine(seed=0, window=6):
    return Engine(load_model("tiny", seed=seed), window=window, max_sessions=2)


def toy_engine(**kw):
    return Engine.from_pretrained("toyworld", max_sessions=2, **kw)


def blocks(eng, sess, n):
    """The session's next n frame blocks; then on to the next block boundary (the last block's commit)."""
    out = []
    while len(out) < n:
        assert eng.step()
        out.extend(sess.poll())
    while not sess.at_block_boundary:
        assert eng.step()
        out.extend(sess.poll())
    assert len(out) == n
    return out


def restore_elsewhere(kind, snap: Path, m: int) -> np.ndarray:
    out = snap.with_suffix(".npy")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", CHILD, kind, str(snap), str(out), str(m)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return np.load(out)


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.array_equal(g, w)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A toy-world stream with actions, snapshotted after 4 blocks (its window has rolled past the sink), and
    its uninterrupted next 3 blocks."""
    eng = toy_engine()
    s = eng.open_session("a red cube in a snowy field", num_frames=None, seed=5, actions=ACTIONS)
    blocks(eng, s, 4)
    sp = eng.kv.sessions[s.id]
    pages, frames, frames_out = sp.pages(), sp.frames(), s.frames_out
    path = tmp_path_factory.mktemp("snap") / "toy.safetensors"
    s.snapshot(path)
    return dict(path=path, want=blocks(eng, s, 3), pages=pages, frames=frames, frames_out=frames_out)


# ---- continuing ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_snapshot_continues_bit_identically_here_and_in_another_process(tmp_path):
    eng = tiny_engine()
    s = eng.open_session("a red ball", num_frames=None, seed=3)
    blocks(eng, s, 2)
    path = tmp_path / "tiny.safetensors"
    s.snapshot(path)
    assert s.status == "running"  # the original goes on untouched
    want = blocks(eng, s, 2)

    eng2 = tiny_engine()
    r = eng2.restore(path)
    assert r.status == "paused" and r.frames_out == 21 and r.num_frames is None
    assert not eng2.step()  # paused: nothing runs until resume()
    r.resume()
    assert_same(blocks(eng2, r, 2), want)
    assert_same(list(restore_elsewhere("tiny", path, 2)), want)


def test_tiny_snapshot_after_the_window_rolled(tmp_path):
    eng = tiny_engine()
    s = eng.open_session("a red ball", num_frames=None, seed=4)
    blocks(eng, s, 3)
    sp = eng.kv.sessions[s.id]
    assert sp.frames_committed > len(sp.pages())  # frames were evicted
    frames = sp.frames()
    s.pause()
    path = tmp_path / "rolled.safetensors"
    s.snapshot(path)  # a session paused at a block boundary can be snapshotted too
    s.resume()
    want = blocks(eng, s, 1)
    eng2 = tiny_engine()
    r = eng2.restore(path)
    assert eng2.kv.sessions[r.id].frames() == frames
    r.resume()
    assert_same(blocks(eng2, r, 1), want)


@pytest.mark.slow
def test_toyworld_with_actions_continues_bit_identically_here_and_in_another_process(toy):
    eng = toy_engine()
    other = eng.open_session("a blue ball", num_frames=None, seed=1)  # holds pages: the restore gets others
    eng.step()
    other.pause()
    r = eng.restore(toy["path"])
    sp = eng.kv.sessions[r.id]
    assert sp.frames() == toy["frames"] and sp.frames()[-1] >= 16 and len(sp.sink) == 8
    assert sp.pages() != toy["pages"]  # fresh pages, written with the saved K/V
    assert r.frames_out == toy["frames_out"]
    r.resume()
    assert_same(blocks(eng, r, 3), toy["want"])
    assert_same(list(restore_elsewhere("toyworld", toy["path"], 3)), toy["want"])


# ---- refusals -------------------------------------------------------------------------------------------------
def test_a_snapshot_is_taken_only_at_a_block_boundary(tmp_path):
    eng = toy_engine()
    s = eng.open_session("a red cube", num_frames=None, seed=0, actions=ACTIONS)
    eng.step()  # the first of its given frames' passes
    with pytest.raises(SnapshotError, match=r"still committing its given frames .*block boundary"):
        s.snapshot(tmp_path / "x.safetensors")
    while not s.at_block_boundary:
        eng.step()
    eng.step()  # the first block's denoising step: inside the block
    s.pause()
    with pytest.raises(SnapshotError, match=r"inside block 0 .*block boundary") as e:
        s.snapshot(tmp_path / "x.safetensors")
    assert "\n" not in str(e.value) and not (tmp_path / "x.safetensors").exists()


def test_recorded_noise_is_refused(tmp_path):
    eng = toy_engine()
    s = eng.open_session("a red cube", num_frames=None, init_frames=None,
                         noise=RecordedNoise(torch.zeros(64, 3, 64, 64), {}))
    with pytest.raises(SnapshotError, match="RecordedNoise"):
        s.snapshot(tmp_path / "x.safetensors")


def test_another_model_is_refused(tmp_path):
    eng = tiny_engine()
    s = eng.open_session("a red ball", num_frames=None, seed=0)
    path = tmp_path / "t.safetensors"
    s.snapshot(path)  # before the first block: no page yet
    other = tiny_engine(seed=1)
    assert model_identity(other) != model_identity(eng)
    with pytest.raises(SnapshotError, match="model differs") as e:
        other.restore(path)
    assert "\n" not in str(e.value) and other.kv.reserved == 0 and not other.sessions
    r = tiny_engine().restore(path)  # the same model is fine, even with nothing committed
    assert r.engine.kv.sessions[r.id].pages() == []


@pytest.mark.parametrize("kw, what", [(dict(window=20), "window differs: snapshot 16, engine 20"),
                                      (dict(sink=4), "sink differs: snapshot 8, engine 4"),
                                      (dict(positions="absolute"), "positions differs"),
                                      (dict(height=128, width=128), "height differs")])
def test_other_engine_settings_are_refused(toy, kw, what):
    eng = toy_engine(**kw)
    with pytest.raises(SnapshotError, match=what):
        eng.restore(toy["path"])
    assert eng.kv.reserved == 0 and eng.pages_in_use == 0 and not eng.sessions and not eng.runner.sessions


def test_a_truncated_file_is_refused(toy, tmp_path):
    data = toy["path"].read_bytes()
    for n in (len(data) // 2, len(data) - 1, 6):
        bad = tmp_path / f"cut{n}.safetensors"
        bad.write_bytes(data[:n])
        eng = toy_engine()
        with pytest.raises(SnapshotError, match="not a readable snapshot file") as e:
            eng.restore(bad)
        assert "\n" not in str(e.value) and eng.kv.reserved == 0


def edited(src: Path, dst: Path, edit) -> Path:
    with safe_open(str(src), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta[HEADER_KEY])
    edit(header, tensors)
    save_file(tensors, str(dst), metadata={HEADER_KEY: json.dumps(header), SUM_KEY: meta[SUM_KEY]})
    return dst


def test_an_edited_file_is_refused(toy, tmp_path):
    eng = toy_engine()
    cases = [
        (lambda h, t: h["session"].__setitem__("frames_out", 0), "checksum mismatch"),
        (lambda h, t: h["engine"].__setitem__("window", 20), "checksum mismatch"),
        (lambda h, t: t["kv.k.0"].add_(1), "checksum mismatch"),
        (lambda h, t: h.__setitem__("version", 3), "snapshot version 3"),
        (lambda h, t: h.__setitem__("format", "other"), "format is 'other'"),
    ]
    for i, (edit, what) in enumerate(cases):
        with pytest.raises(SnapshotError, match=what):
            eng.restore(edited(toy["path"], tmp_path / f"e{i}.safetensors", edit))
    assert eng.kv.reserved == 0 and not eng.sessions


def test_restore_into_a_full_pool_raises_admission_error_and_reserves_nothing(toy):
    eng = Engine.from_pretrained("toyworld", max_sessions=1)  # one window of pages
    eng.open_session("a red cube", num_frames=None, seed=0)
    eng.step()
    reserved, used, sids = eng.kv.reserved, eng.pages_in_use, set(eng.scheduler.seqs)
    with pytest.raises(AdmissionError, match="16 KV pages"):
        eng.restore(toy["path"])
    assert (eng.kv.reserved, eng.pages_in_use, set(eng.scheduler.seqs)) == (reserved, used, sids)
    assert set(eng.runner.sessions) == sids and set(eng.sessions) == sids


def test_state_that_is_not_plain_data_is_refused_by_name():
    with pytest.raises(SnapshotError, match=r"decoder_state\['cache'\]\[1\]: a value of type builtins\.object"):
        _Writer().encode({"cache": [torch.zeros(1), object()]}, "decoder_state")


def test_model_identity_is_computed_once_per_engine():
    eng = toy_engine()
    a = model_identity(eng)
    assert len(a) == 64 and eng._snapshot_identity == a and model_identity(eng) is a
    assert model_identity(toy_engine()) == a  # the same weights and config: the same identity


def test_mirror_lanes_are_saved_and_a_lane_count_mismatch_is_refused(tmp_path):
    eng = toy_engine(mirrors=("h",))
    s = eng.open_session("a red cube", num_frames=None, seed=2, actions=ACTIONS)
    blocks(eng, s, 2)
    path = tmp_path / "m.safetensors"
    s.snapshot(path)
    want = blocks(eng, s, 2)
    with pytest.raises(SnapshotError, match="kv_lanes differs: snapshot 2, engine 1"):
        toy_engine().restore(path)
    eng2 = toy_engine(mirrors=("h",))
    r = eng2.restore(path)
    r.resume()
    assert_same(blocks(eng2, r, 2), want)


def overlapped_blocks(eng, sess, n):
    """The session's next n frame blocks with overlapped decode: how many are out by the next block boundary
    depends on the decode thread's timing, so the stream runs to a boundary with at least n out."""
    out = []
    while len(out) < n or not sess.at_block_boundary:
        assert eng.step()
        out.extend(sess.poll())
    return out


def test_overlapped_decode_is_finished_before_the_snapshot(tmp_path):
    eng = toy_engine(overlap_decode=True)
    s = eng.open_session("a red cube", num_frames=None, seed=6, actions=ACTIONS)
    overlapped_blocks(eng, s, 3)
    path = tmp_path / "o.safetensors"
    s.snapshot(path)
    assert s.pending == 0
    want = overlapped_blocks(eng, s, 2)[:2]
    eng2 = toy_engine(overlap_decode=True)
    r = eng2.restore(path)
    r.resume()
    assert_same(overlapped_blocks(eng2, r, 2)[:2], want)


def test_a_fork_sharing_its_parents_pages_snapshots_and_continues(tmp_path):
    """A fork's pages are shared copy-on-write with its parent: its snapshot holds their K/V all the same, and the
    restored fork continues as the fork does, while the parent is untouched."""
    eng = tiny_engine()
    s = eng.open_session("a red ball", num_frames=None, seed=6)
    blocks(eng, s, 2)
    f = s.fork()
    shared = set(eng.kv.sessions[s.id].pages()) & set(eng.kv.sessions[f.id].pages())
    assert shared  # copy-on-write: nothing copied yet
    s.pause()
    f.resume()
    path = tmp_path / "fork.safetensors"
    f.snapshot(path)
    want = blocks(eng, f, 2)
    f.cancel()
    s.resume()
    parent_next = blocks(eng, s, 1)
    eng2 = tiny_engine()
    r = eng2.restore(path)
    r.resume()
    assert_same(blocks(eng2, r, 2), want)
    # the fork continued exactly where the parent continues (same state, same noise stream)
    assert_same(parent_next, want[:1])


def test_a_version_1_file_still_restores(toy, tmp_path):
    """Version 1 kept a counter (prefill_frames) that nothing read: such a file restores and continues alike."""
    from inferix.snapshot import _checksum
    with safe_open(str(toy["path"]), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta[HEADER_KEY])
    assert header["version"] == 2 and "prefill_frames" not in json.dumps(header["session"]["seq"])
    header["version"] = 1
    header["session"]["seq"]["dict"].append(["prefill_frames", 0])  # the counters are encoded as [key, value] pairs
    text = json.dumps(header)
    old = tmp_path / "v1.safetensors"
    save_file(tensors, str(old), metadata={HEADER_KEY: text, SUM_KEY: _checksum(text, tensors)})
    eng = toy_engine()
    r = eng.restore(old)
    r.resume()
    assert_same(blocks(eng, r, 1), toy["want"][:1])
