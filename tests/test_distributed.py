"""Sequence- and CFG-parallel runs on the CPU with gloo: 2 and 4 processes give what one process gives.

Each test starts its ranks as plain processes with the environment torchrun would give them (RANK, WORLD_SIZE,
MASTER_ADDR/PORT on a free port); this file is also the worker (``python tests/test_distributed.py SCENARIO
OUT``). Every launch is bounded by a timeout, and rank 0 writes what it made to OUT for the test to compare with
the same calls run here, in one process.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIXTURES = HERE / "fixtures"
FIXTURE_NAMES = ["self_forcing_tiny", "self_forcing_tiny_window", "self_forcing_tiny_first_frame"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, world: int, out: Path, *, timeout: float = 60, wait_for=None, env=None) -> list:
    """Start ``world`` ranks of a scenario; wait for the ranks in ``wait_for`` (default all), then end the rest.
    Returns [(returncode or None when it had to be killed, stderr)] per rank. A port taken between choosing it and
    binding it (other programs share the machine) gets one more try on a new port."""
    results = _launch_once(scenario, world, out, timeout=timeout, wait_for=wait_for, env=env)
    if any(err and "address already in use" in err.lower() for _, err in results):
        results = _launch_once(scenario, world, out, timeout=timeout, wait_for=wait_for, env=env)
    return results


def _launch_once(scenario: str, world: int, out: Path, *, timeout: float, wait_for, env) -> list:
    out.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # only the triton test interprets
    base.update(WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
                INFERIX_DIST_TIMEOUT="20", PYTHONPATH=str(HERE))
    base.update(env or {})
    procs = []
    for r in range(world):
        e = dict(base, RANK=str(r), LOCAL_RANK=str(r))
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), scenario, str(out)], env=e,
                                      cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + timeout
    results = [None] * world
    try:
        for r in (range(world) if wait_for is None else wait_for):
            left = max(0.1, deadline - time.monotonic())
            try:
                _, err = procs[r].communicate(timeout=left)
                results[r] = (procs[r].returncode, err)
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {r} of scenario {scenario!r} did not end within {timeout} s (a hang)")
    finally:
        for r, p in enumerate(procs):
            if p.poll() is None:
                p.kill()
            if results[r] is None:
                _, err = p.communicate()
                results[r] = (None, err)
    return results


def _ok(results):
    for r, (rc, err) in enumerate(results):
        assert rc == 0, f"rank {r} ended with {rc}:\n{err[-3000:]}"


# ---- scenarios: the same calls, in one process (parallel=None) or on every rank -----------------------------
def engine_runs(parallel=None) -> dict:
    """Batched sessions and a fork on padded frames (15 tokens: sp does not divide them), global attention; then
    a rolling window with sink and cache-relative RoPE, with a prompt switch that re-commits the window."""
    from engine_utils import tiny_bundle
    from inferix.engine import Engine

    res = {}
    eng = Engine(tiny_bundle(0), height=48, width=80, window=None, kv_pages=64, keep_latents=True, max_batch=8,
                 parallel=parallel)
    a = eng.open_session("a red ball", num_frames=9, seed=1)
    b = eng.open_session("a blue car", num_frames=6, seed=2)
    while not (len(a.latents) >= 1 and a.at_block_boundary):
        eng.step()
    child = a.fork()
    child.set_prompt("snow in the city")
    child.resume()
    eng.run_until_idle()
    res.update(a=torch.cat(a.latents), b=torch.cat(b.latents), fork=torch.cat(child.latents))

    eng = Engine(tiny_bundle(1), window=6, sink=3, kv_pages=32, keep_latents=True, parallel=parallel)
    c = eng.open_session("a cat", num_frames=15, seed=3, prompt_schedule=[(9, "a dog")], recache=True)
    d = eng.open_session("a tree", num_frames=12, seed=4)
    eng.run_until_idle()
    res.update(window_recache=torch.cat(c.latents), window=torch.cat(d.latents))
    return res


def cfg_runs(parallel=None) -> dict:
    from engine_utils import tiny_bundle
    from inferix.engine import Engine
    from inferix.models.schedule import SamplingConfig

    sampling = SamplingConfig(denoising_steps=[0] * 4, sampler="euler", warp=False, shift=3.0, guidance_scale=4.0,
                              negative_prompt="blurry")
    eng = Engine(tiny_bundle(0, sampling=sampling), window=None, kv_pages=32, keep_latents=True, parallel=parallel)
    s = eng.open_session("a red ball", num_frames=6, seed=0)
    t = eng.open_session("a blue car", num_frames=3, seed=5)
    eng.run_until_idle()
    return {"s": torch.cat(s.latents), "t": torch.cat(t.latents), "forward_calls": eng.runner.forward_calls}


def serve_runs(parallel=None, idle_s: float = 0.0) -> dict | None:
    """A server's calls through ``lead_or_follow``: sessions opened and steered between steps, a fork, a cancel,
    and an idle spell longer than the collective timeout (heartbeats keep the followers)."""
    from engine_utils import tiny_bundle
    from inferix.engine import Engine
    from inferix.parallel import lead_or_follow

    eng = Engine(tiny_bundle(2), window=None, kv_pages=64, keep_latents=True, parallel=parallel)
    h = lead_or_follow(eng, heartbeat_s=0.5)
    if h is None:
        return None
    a = h.open_session("a red ball", num_frames=9, seed=1)
    b = h.open_session("a blue car", num_frames=9, seed=2)
    x = h.open_session("gone soon", num_frames=9, seed=3)
    h.step()
    x.cancel()
    time.sleep(idle_s)
    b.set_prompt("a green field")
    while not (len(a.latents) >= 1 and a.at_block_boundary):
        h.step()
    child = a.fork()
    child.resume()
    for _ in a:
        pass
    h.run_until_idle()
    h.close()
    return {"a": torch.cat(a.latents), "b": torch.cat(b.latents), "fork": torch.cat(child.latents)}


def _worker(scenario: str, out: Path) -> None:
    from inferix.fixture import verify_fixture
    from inferix.parallel import ParallelError, init_parallel

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    if scenario.startswith("fixtures"):  # fixtures-<backend>,<backend>
        par = init_parallel(world)
        backends = scenario.split("-")[1].split(",")
        res = {(name, att): verify_fixture(FIXTURES / name, attention=att, parallel=par)
               for att in backends for name in _fixture_names(backends)}
    elif scenario == "engine":
        par = init_parallel(world)
        res = engine_runs(par)
    elif scenario == "four":  # one launch of 4 ranks: the fixtures and engine runs on sp 4, then sp 2 x CFG
        par = init_parallel(world)
        res = {(name, "sdpa"): verify_fixture(FIXTURES / name, attention="sdpa", parallel=par)
               for name in FIXTURE_NAMES}
        res.update(engine_runs(par))
        par = init_parallel(2, cfg_parallel=True)  # new groups on the same process group
        res.update({"cfg_" + k: v for k, v in cfg_runs(par).items()})
    elif scenario == "cfg":
        par = init_parallel(world // 2, cfg_parallel=True)
        res = cfg_runs(par)
    elif scenario == "serve":
        par = init_parallel(world)
        res = serve_runs(par, idle_s=float(os.environ["INFERIX_DIST_TIMEOUT"]) * 1.5)
        if res is None:  # a follower, released by rank 0's close()
            (out / f"follower{rank}.done").write_text("ok")
            par.close()  # leave the process group before exiting (else gloo may abort at exit)
            return
    elif scenario in ("kill", "hang", "mismatch"):
        from engine_utils import tiny_bundle
        from inferix.engine import Engine
        par = init_parallel(world)
        eng = Engine(tiny_bundle(0), window=None, kv_pages=64, parallel=par)
        frames = 12 if (scenario == "mismatch" and rank == 1) else 6
        eng.open_session("a red ball", num_frames=frames, seed=0)
        n = 0
        tic = None
        try:
            while eng.step():
                n += 1
                if rank == 1 and n == 3 and scenario == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if rank == 1 and n == 3 and scenario == "hang":
                    time.sleep(60)  # alive but silent: rank 0 must give up after the timeout
                tic = time.monotonic()
        except ParallelError as e:
            waited = time.monotonic() - (tic or time.monotonic())
            print(f"PARALLEL_ERROR after {waited:.1f} s: {e}", file=sys.stderr, flush=True)
            os._exit(3)
        res = {"steps": n}
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    torch.save(res, out / f"rank{rank}.pt")
    par.close()


# ---- tests -------------------------------------------------------------------------------------------------
def _fixture_names(backends) -> list:
    """The interpreted Triton kernels replay the rolled window with sink only (the interpreter is slow)."""
    return FIXTURE_NAMES[1:2] if backends == ["triton"] else FIXTURE_NAMES


def _single_fixture_errors(backends) -> dict:
    from inferix.fixture import verify_fixture
    return {(n, b): verify_fixture(FIXTURES / n, attention=b) for b in backends for n in _fixture_names(backends)}


def _check_fixtures(tmp_path, world: int, backends: list[str], env=None, timeout=60):
    results = _launch("fixtures-" + ",".join(backends), world, tmp_path, timeout=timeout, env=env)
    _ok(results)
    _check_fixture_results(tmp_path, world, backends)


def _check_fixture_results(tmp_path, world: int, backends: list[str]):
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    one = _single_fixture_errors(backends)
    for key, single in one.items():
        sp = got[0][key]
        assert sp["passed"], (key, sp)
        assert sp["parallel"]["sp"] == sp["parallel"]["world"] == world and sp["parallel"]["backend"] == "gloo"
        # the same tolerance as one process: within a hair of its errors, for latents, x0 and the layer-0 keys
        for k in ("latents_max_abs_err", "x0_max_abs_err", "kv_layer0_k_max_abs_err"):
            if single.get(k) is not None:
                assert sp[k] <= single["tolerance"] and abs(sp[k] - single[k]) <= 1e-5, (key, k, sp[k], single[k])
        assert all(g[key]["latents_max_abs_err"] == sp["latents_max_abs_err"] for g in got)  # every rank agrees


def test_fixtures_replay_on_two_ranks(tmp_path):
    """Global attention, rolled window with sink, independent first frame: reference and sdpa backends."""
    _check_fixtures(tmp_path, 2, ["reference", "sdpa"])


@pytest.mark.slow
def test_four_ranks_fixtures_engine_and_cfg_with_sp(tmp_path):
    """sp 4: the fixtures' model has 2 heads, so two ranks hold a zero padding head, and the engine runs' 15-token
    frames are padded to 16; then sp 2 x CFG 2 on the same ranks."""
    single = engine_runs()
    single.update({"cfg_" + k: v for k, v in cfg_runs().items()})
    _compare(tmp_path, 4, "four", single)
    _check_fixture_results(tmp_path, 4, ["sdpa"])


@pytest.mark.slow
def test_fixtures_replay_with_triton_interpreted(tmp_path):
    _check_fixtures(tmp_path, 2, ["triton"], env={"TRITON_INTERPRET": "1"}, timeout=90)


def _compare(tmp_path, world, scenario, single, atol=1e-5):
    results = _launch(scenario, world, tmp_path, timeout=120)
    _ok(results)
    for r in range(world):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for k, v in single.items():
            if isinstance(v, torch.Tensor):
                assert got[k].shape == v.shape, (k, got[k].shape, v.shape)
                assert (got[k] - v).abs().max() <= atol, (r, k, float((got[k] - v).abs().max()))


@pytest.mark.slow
def test_batched_sessions_fork_window_and_padded_tokens_match_one_process(tmp_path):
    _compare(tmp_path, 2, "engine", engine_runs())


@pytest.mark.slow
def test_cfg_parallel_matches_one_process(tmp_path):
    single = cfg_runs()
    _compare(tmp_path, 2, "cfg", single)
    # each rank runs one of the two passes of a denoise step: 2 steps x (4 + 1 commit) passes, not 2 x (2 x 4 + 1)
    assert torch.load(tmp_path / "rank0.pt")["forward_calls"] == 10 and single["forward_calls"] == 18


@pytest.mark.slow
def test_followers_replay_a_servers_calls(tmp_path):
    results = _launch("serve", 2, tmp_path, timeout=60, env={"INFERIX_DIST_TIMEOUT": "3"})
    _ok(results)
    assert (tmp_path / "follower1.done").exists()
    got, single = torch.load(tmp_path / "rank0.pt"), serve_runs()
    for k, v in single.items():
        assert (got[k] - v).abs().max() <= 1e-5, k


@pytest.mark.slow
def test_killed_rank_ends_the_run_with_an_error(tmp_path):
    tic = time.monotonic()
    results = _launch("kill", 2, tmp_path, timeout=40)
    rc, err = results[0]
    assert rc == 3, err[-2000:]
    assert "PARALLEL_ERROR" in err and "another rank failed" in err
    assert results[1][0] == -signal.SIGKILL
    assert time.monotonic() - tic < 40


@pytest.mark.slow
def test_silent_rank_times_out(tmp_path):
    results = _launch("hang", 2, tmp_path, timeout=40, wait_for=[0], env={"INFERIX_DIST_TIMEOUT": "3"})
    rc, err = results[0]
    assert rc == 3 and "PARALLEL_ERROR" in err and "timeout 3 s" in err, err[-2000:]
    waited = float(err.split("PARALLEL_ERROR after ")[1].split(" s")[0])
    assert waited < 15


@pytest.mark.slow
def test_ranks_that_plan_differently_are_stopped(tmp_path):
    results = _launch("mismatch", 2, tmp_path, timeout=40)
    for rc, err in results:
        assert rc == 3 and "disagree with rank 0 on the plan" in err, err[-2000:]


def test_sp_without_a_launcher_is_a_usage_error(capsys):
    from inferix.cli import main
    assert main(["verify-fixture", str(FIXTURES / "self_forcing_tiny"), "--sp", "2"]) == 2
    err = capsys.readouterr().err
    assert "--sp 2 runs on 2 processes, this run has 1" in err and "torchrun --nproc-per-node 2" in err


@pytest.mark.slow
def test_torchrun_cli_generate_and_verify(tmp_path):
    """torchrun runs the CLI itself: only rank 0 writes the video, which matches one process's."""
    import av
    import numpy as np

    env = dict(os.environ, OMP_NUM_THREADS="1", INFERIX_DIST_TIMEOUT="30")
    env.pop("TRITON_INTERPRET", None)
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "inferix.cli"]
    p = subprocess.run(run + ["verify-fixture", str(FIXTURES / "self_forcing_tiny_window"), "--sp", "2"],
                       env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=90)
    assert p.returncode == 0 and p.stdout.count("PASS:") == 1, p.stderr[-3000:]
    gen = ["generate", "--model", "tiny", "--frames", "9", "--device", "cpu"]
    (tmp_path / "sp").mkdir()
    p = subprocess.run(run + gen + ["--sp", "2", "--out", "v.mp4"], env=env, cwd=str(tmp_path / "sp"),
                       capture_output=True, text=True, timeout=90)
    assert p.returncode == 0 and p.stdout.count("wrote 9 frames") == 1, p.stderr[-3000:]
    assert sorted(f.name for f in (tmp_path / "sp").iterdir()) == ["v.mp4"]
    from inferix.cli import main
    assert main(gen + ["--out", str(tmp_path / "one.mp4")]) == 0

    def frames(path):
        with av.open(str(path)) as c:
            return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(int)
    a, b = frames(tmp_path / "sp" / "v.mp4"), frames(tmp_path / "one.mp4")
    assert a.shape == b.shape and np.abs(a - b).max() <= 2


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
