"""``torchrun --nproc-per-node 2 -m inferix serve --sp 2``: rank 0 serves, rank 1 follows its engine calls; the
frames a client gets are the frames of a one-process server, and SIGTERM ends both ranks cleanly."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from server_proc import ServerProcess, free_port
from test_api import Conn, open_session

pytestmark = pytest.mark.slow
TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", "2"]
ARGS = ("--height", "32", "--width", "32", "--max-sessions", "2", "--dist-timeout", "60")


def frames_of(srv, seed: int, n_blocks: int) -> np.ndarray:
    s = open_session(srv, prompt="a red ball", seed=seed, video="jpeg")
    c = Conn(srv, s)
    for _ in range(n_blocks):
        c.event("block", timeout=120)
    c.event("block", timeout=120)  # the images of the last counted block are in
    c.send(type="close")
    c.event("end", timeout=60)
    ends = [b["frames"][1] for b in c.blocks()[:n_blocks]]
    imgs = np.stack([np.asarray(Image.open(io.BytesIO(b))) for _, b in c.binary])
    return imgs[: ends[-1]]


def test_sequence_parallel_server_matches_one_process():
    with ServerProcess(*ARGS, model="tiny") as one:
        want = frames_of(one, seed=4, n_blocks=2)
    srv = ServerProcess(*ARGS, "--sp", "2", model="tiny", launcher=TORCHRUN + ["--master-port", str(free_port())],
                        start_timeout=180)
    try:
        got = frames_of(srv, seed=4, n_blocks=2)
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 2  # fp32 SP equals one process to ~1e-6
        assert srv.get("/v1/health")["kv_pages_used"] == 0
        # a service manager stops rank 0 (the server): it ends its followers, and every process exits 0
        ranks = {}
        for pid in subprocess.run(["pgrep", "-P", str(srv.proc.pid)], capture_output=True, text=True).stdout.split():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = next((e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")), None)
            if rank is not None:
                ranks[int(rank)] = int(pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[0], signal.SIGTERM)
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()
