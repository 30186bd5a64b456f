"""``inferix serve --ray``: two engine replicas of the toy world behind one API on a local Ray cluster (bounded:
2 logical CPUs, one torch thread per replica), started the way an operator starts a cluster (``ray start --head``,
then ``inferix serve --ray ADDRESS``).

Sessions spread over both replicas; a full cluster queues in the router and places a waiting session when any
replica frees pages; forks and snapshots stay on their session's replica; a killed replica ends only its own
sessions (their clients get an error and a closed stream) and Ray starts a new one; every replica's pages return
to zero; SIGTERM stops it all cleanly.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from server_proc import ROOT, ServerProcess, free_port
from test_api import PROMPT, Conn, open_session

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")


def wait_for(pred, timeout, what, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class RayServer(ServerProcess):
    """``inferix serve --ray ADDRESS`` on a fresh ``ray start --head`` cluster; stopped with the cluster."""

    def __init__(self):
        self.ray_port = free_port()
        # Ray's token authentication: the cluster makes a token (~/.ray/auth_token) that its clients read
        ray_env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
        env = dict(os.environ, **ray_env)
        r = subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.ray_port),
                            "--num-cpus", "2",
                            "--include-dashboard=false", "--disable-usage-stats"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        try:
            super().__init__("--ray", f"127.0.0.1:{self.ray_port}", "--replicas", "2", "--max-sessions", "1",
                             "--idle-timeout", "60", "--max-queue", "2", start_timeout=180, env=ray_env)
            wait_for(lambda: self.get("/v1/health")["replicas_up"] == 2, 120, "both replicas")
        except BaseException:
            self.stop_cluster()
            raise

    def stop_cluster(self):
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120,
                       env=dict(os.environ, RAY_AUTH_MODE="token"))

    def stop(self, timeout: float = 90) -> int:
        try:
            return super().stop(timeout)
        finally:
            self.stop_cluster()


@pytest.fixture(scope="module")
def cluster():
    srv = RayServer()
    try:
        yield srv
    finally:
        srv.stop()


def replica_of(sess) -> str:
    return sess["id"].split("-", 1)[0]


def pages_zero_everywhere(srv):
    def ok():
        h = srv.get("/v1/health")
        return h["replicas_up"] == 2 and all(r.get("kv_pages_used") == 0 for r in h["by_replica"]) and h
    return wait_for(ok, 30, "every replica's pages back to 0")


def test_sessions_spread_queue_and_place_when_any_replica_frees(cluster):
    a = open_session(cluster, video="jpeg")
    b = open_session(cluster, video="jpeg")
    assert {replica_of(a), replica_of(b)} == {"0", "1"}  # most free pages first: one on each
    q = open_session(cluster, video="jpeg")
    assert q["state"] == "waiting" and q["position"] == 0 and q["id"].startswith("q-")
    # the router's queue is bounded too (--max-queue 2)
    q2 = open_session(cluster, video="jpeg")
    assert q2["position"] == 1
    status, body = cluster.request("POST", "/v1/sessions", {"prompt": PROMPT})
    assert status == 503 and body["error"]["code"] == "busy"
    assert cluster.get(f"/v1/sessions/{q['id']}", token=q["token"])["state"] == "waiting"
    assert cluster.request("GET", f"/v1/sessions/{q['id']}", token="nope")[0] == 403
    ca, cq = Conn(cluster, a), Conn(cluster, q)
    ca.event("block")
    cq.event("state", state="waiting")
    # b's replica frees its pages: the first queued session goes there
    status, _ = cluster.request("DELETE", f"/v1/sessions/{b['id']}", token=b["token"])
    assert status == 200
    first = cq.event("block", timeout=60)
    assert first["frames"] == [0, 4]
    st = cluster.get(f"/v1/sessions/{q['id']}", token=q["token"])
    assert st["state"] == "running" and st["id"] == q["id"]
    cq.send(type="act", action="up", seq=1)
    cq.seen("applied", seq=1)
    for c in (ca, cq):
        c.send(type="close")
        c.event("end")
    for s in cluster.get("/v1/health")["by_replica"]:
        assert s["status"] == "ok"
    # the second queued session was placed when the first closed; it ends too
    wait_for(lambda: cluster.get("/v1/health")["waiting"] == 0, 30, "the queue to drain")
    assert cluster.get(f"/v1/sessions/{q2['id']}", token=q2["token"])["state"] == "running"
    assert cluster.request("DELETE", f"/v1/sessions/{q2['id']}", token=q2["token"])[0] == 200
    pages_zero_everywhere(cluster)


def test_fork_and_snapshot_stay_on_the_sessions_replica(cluster):
    for s in cluster.get("/v1/health")["by_replica"]:
        assert s["kv_pages_used"] == 0
    a = open_session(cluster, video="jpeg")
    c = Conn(cluster, a)
    c.event("block")
    c.send(type="snapshot", seq=1)
    snap = c.seen("snapshot", seq=1)
    assert snap["snapshot"].startswith(replica_of(a) + "-")
    status, data = cluster.request("GET", f"/v1/snapshots/{snap['snapshot']}")
    assert status == 200 and len(data) == snap["bytes"]
    # a fork shares its parent's pages, so it lands on the parent's replica (a pool for one session: it is
    # refused for want of pages there, never placed elsewhere)
    status, f = cluster.request("POST", f"/v1/sessions/{a['id']}/fork", token=a["token"])
    assert status == 503 and "KV budget" in f["error"]["message"]
    c.send(type="close")
    c.event("end")
    pages_zero_everywhere(cluster)
    r = open_session(cluster, snapshot=snap["snapshot"], video="jpeg")
    assert replica_of(r) == replica_of(a) and r["frames"] == snap["frame"]
    rc = Conn(cluster, r)
    assert rc.event("block")["frames"][0] == snap["frame"]
    rc.send(type="close")
    rc.event("end")
    m = cluster.get("/metrics").decode()
    assert 'inferix_kv_pages_total{replica="0"}' in m and 'inferix_kv_pages_total{replica="1"}' in m
    assert "inferix_replicas_up 2" in m
    pages_zero_everywhere(cluster)


def test_a_killed_replica_ends_only_its_sessions(cluster):
    a = open_session(cluster, video="jpeg")
    b = open_session(cluster, video="jpeg")
    ca, cb = Conn(cluster, a), Conn(cluster, b)
    ca.event("block")
    cb.event("block")
    victim = replica_of(a)
    r = subprocess.run(["pkill", "-9", "-f", f"ServeReplica:inferix:engine{victim}"], capture_output=True)
    assert r.returncode == 0, "no replica process to kill"
    t0 = time.monotonic()
    err = ca.event("error", timeout=30)
    assert err["code"] == "replica_lost"
    assert ca.event("end", timeout=10)["reason"] == "failed"
    assert time.monotonic() - t0 < 30
    # the other replica's session streams on
    n = len(cb.blocks())
    cb.event("block")
    cb.event("block")
    assert len(cb.blocks()) >= n + 2
    cb.send(type="close")
    cb.event("end")
    # new sessions go to the live replica at once
    s = wait_for(lambda: (lambda st_r: st_r[1] if st_r[0] == 201 else None)(
        cluster.request("POST", "/v1/sessions", {"prompt": PROMPT, "video": "jpeg"})), 30, "a new session")
    assert replica_of(s) != victim
    cs = Conn(cluster, s)
    cs.event("block")
    cs.send(type="close")
    cs.event("end")
    # Ray Serve starts a new replica in its place
    wait_for(lambda: cluster.get("/v1/health")["replicas_up"] == 2, 120, "the replica to be replaced", interval=1)
    pages_zero_everywhere(cluster)


def test_sigterm_stops_the_cluster_app_cleanly(cluster):
    a = open_session(cluster, video="jpeg")
    c = Conn(cluster, a)
    c.event("block")
    cluster.proc.send_signal(signal.SIGTERM)
    end = c.event("end", timeout=60)
    assert end["reason"] in ("server_shutdown", "failed")
    assert cluster.proc.wait(90) == 0
    assert json.loads(json.dumps(end))  # a well-formed event


def test_build_app_reads_operator_arguments():
    """The application builder a Serve config file names (docs/ray-serve.yaml) parses its arguments."""
    import yaml
    from ray.serve import Application

    from inferix.app.serve_ray import build_app
    conf = yaml.safe_load((ROOT / "docs" / "ray-serve.yaml").read_text())
    args = conf["applications"][0]["args"]
    assert conf["applications"][0]["import_path"] == "inferix.app.serve_ray:build_app"
    assert isinstance(build_app(args), Application)
    assert isinstance(build_app({"replicas": "3", "model": "tiny", "idle-timeout": "5", "api_key": "k" * 12}),
                      Application)
    with pytest.raises(ValueError, match="unknown argument 'replicaz'"):
        build_app({"replicaz": "2"})
    with pytest.raises(ValueError, match="replicas must be an int >= 1"):
        build_app({"replicas": "0"})
