"""Decode overlapped with the next passes (Engine(overlap_decode=True)): the same frames, in the same order, as
decoding in line; a stream's first frames are not held back; a failing decode ends its stream only; a fork waits
for its source's decodes (it copies the decoder state)."""
import threading

import numpy as np
import pytest

from inferix.engine import Engine
from inferix.models.bundle import load_model
from inferix.scheduler import FAILED


def engine(overlap, **kw):
    return Engine(load_model("tiny"), window=6, max_sessions=3, overlap_decode=overlap, **kw)


def run(eng, n_frames=33, seeds=(0, 1)):
    """Two sessions side by side; the blocks each delivers, in order."""
    sess = [eng.open_session("a red ball", num_frames=n_frames, seed=s) for s in seeds]
    got = {s.id: [] for s in sess}
    while not all(s.done for s in sess):
        eng.step()
        for s in sess:
            got[s.id].extend(s.poll())
    return [got[s.id] for s in sess], sess


def test_overlapped_decode_gives_the_same_frames_in_the_same_order():
    (a0, b0), _ = run(engine(False))
    eng = engine(True)
    decode_threads = set()
    real = eng.bundle.decoder.decode_block

    def spy(state, x):
        decode_threads.add(threading.current_thread().name)
        return real(state, x)
    eng.bundle.decoder.decode_block = spy
    (a1, b1), sess = run(eng)
    assert decode_threads == {"inferix-decode_0"}  # decoded on the worker, not in line
    for x, y in ((a0, a1), (b0, b1)):
        assert [len(b) for b in x] == [len(b) for b in y]
        np.testing.assert_array_equal(np.concatenate(x), np.concatenate(y))
    assert all(s.frames_out == 33 and s.pending == 0 for s in sess)
    assert eng.stats()["time_split_s"]["decode_overlapped"] > 0 and eng.kv.reserved == 0


def test_first_frames_are_delivered_by_the_step_after_the_block_is_made():
    eng = engine(True)
    s = eng.open_session("a red ball", num_frames=None, seed=0)
    steps = 0
    while not s.blocks:
        made = eng.runner.forward_calls
        eng.step()
        steps += 1
        assert steps < 20
    # the first block's last denoise step handed it to the worker; the very next step delivered it
    plain = engine(False)
    p = plain.open_session("a red ball", num_frames=None, seed=0)
    plain_steps = 0
    while not p.blocks:
        plain.step()
        plain_steps += 1
    assert steps <= plain_steps + 1 and made > 0
    np.testing.assert_array_equal(s.blocks[0], p.blocks[0])


def test_a_failing_overlapped_decode_ends_only_its_stream():
    eng = engine(True)
    a = eng.open_session("a red ball", num_frames=None, seed=0)
    b = eng.open_session("a red ball", num_frames=None, seed=1)
    bad = eng.runner.sessions[b.id].decoder_state
    real = eng.bundle.decoder.decode_block

    def decode_block(state, x):
        if state is bad:
            raise RuntimeError("decoder state corrupted")
        return real(state, x)
    eng.bundle.decoder.decode_block = decode_block
    for _ in range(30):
        eng.step()
        if len(a.poll()) and b.status == FAILED:
            break
    assert b.status == FAILED and "decoder state corrupted" in str(b.error)
    assert a.error is None and a.status == "running" and eng.kv.reserved == a._s.budget
    with pytest.raises(RuntimeError, match="decoder state corrupted"):
        list(b)


def test_a_fork_waits_for_its_sources_decodes_and_continues_like_it():
    eng = engine(True)
    s = eng.open_session("a red ball", num_frames=None, seed=0)
    while eng.runner.forward_calls < 5:  # at least one block handed to the worker
        eng.step()
    child = s.fork()
    assert s.pending == 0  # the fork drained its source's decodes before copying the decoder state
    s.poll()  # what the source made before the fork
    child.resume()
    got = {s.id: [], child.id: []}
    while min(len(v) for v in got.values()) < 2:
        eng.step()
        for x in (s, child):
            got[x.id].extend(x.poll())
    for x, y in zip(got[s.id][:2], got[child.id][:2]):  # a fork draws the same noise: it repeats its source
        assert x.shape == y.shape and np.abs(x.astype(int) - y).max() <= 1
