"""`inferix generate --snapshot` / `--restore`: a stream saved at a block boundary and continued by another run."""
import av
import numpy as np

from inferix.cli import main


def frames(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_snapshot_then_restore_continues_the_stream(tmp_path, capsys):
    snap, full, rest = tmp_path / "s.safetensors", tmp_path / "full.mp4", tmp_path / "rest.mp4"
    assert main(["generate", "--model", "tiny", "--frames", "49", "--snapshot", str(snap), "--snapshot-at", "20",
                 "--out", str(full)]) == 0
    err = capsys.readouterr().err
    assert snap.is_file() and "snapshot after 21 frames" in err  # the first block boundary after 20 frames
    assert main(["generate", "--model", "tiny", "--restore", str(snap), "--out", str(rest)]) == 0
    assert "wrote 28 frames" in capsys.readouterr().out  # the 49 - 21 frames after the snapshot
    a, b = frames(full), frames(rest)
    assert b.shape == (28, 64, 64, 3)
    assert np.abs(a[-28:].astype(int) - b).mean() < 2.0  # the same frames, each mp4 encoded on its own


def test_restore_refuses_another_model_and_a_bad_file(tmp_path, capsys):
    snap = tmp_path / "s.safetensors"
    assert main(["generate", "--model", "tiny", "--frames", "25", "--snapshot", str(snap),
                 "--out", str(tmp_path / "a.mp4")]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", "toyworld", "--restore", str(snap), "--out", str(tmp_path / "b.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "differs" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(snap.read_bytes()[:1000])
    assert main(["generate", "--model", "tiny", "--restore", str(bad), "--out", str(tmp_path / "c.mp4")]) == 2
    assert "not a readable snapshot file" in capsys.readouterr().err
    assert not (tmp_path / "b.mp4").exists() and not (tmp_path / "c.mp4").exists()
    assert main(["generate", "--model", "tiny", "--snapshot", str(snap), "--restore", str(snap),
                 "--out", str(tmp_path / "d.mp4")]) == 2
    assert "do not go together" in capsys.readouterr().err
