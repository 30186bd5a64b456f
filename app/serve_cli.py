"""``inferix serve``: registered through the ``inferix.commands`` entry-point group (the engine's CLI never
imports the server). FastAPI and uvicorn are imported only when the command runs."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

__all__ = ["register", "add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="preset (toyworld, tiny, ...) or checkpoint path; default: the "
                   "embedded toy world, else the tiny preset")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("INFERIX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every API route (default: $INFERIX_API_KEY; none)")
    p.add_argument("--max-sessions", type=int, default=4, help="streams the KV pool holds at once (sizes the pool); "
                   "later ones wait (default 4)")
    p.add_argument("--kv-pages", type=int, default=None, help="KV pool size in pages (overrides --max-sessions)")
    p.add_argument("--max-queue", type=int, default=16, help="sessions that may wait for KV pages (default 16); "
                   "beyond that a new session is refused with 503")
    p.add_argument("--max-frames", type=int, default=100000, help="most pixel frames a session may ask for")
    p.add_argument("--idle-timeout", type=float, default=120, help="seconds a session may have no connected "
                   "client before it is closed and its pages freed (default 120; 0: never)")
    p.add_argument("--max-ahead", type=int, default=2, help="blocks a session may run ahead of what its client "
                   "has received (default 2)")
    p.add_argument("--max-body-kib", type=int, default=8192, help="largest HTTP request body in KiB (default 8192)")
    p.add_argument("--max-message-kib", type=int, default=64, help="largest WebSocket or data-channel message in "
                   "KiB (default 64)")
    p.add_argument("--max-prompt-chars", type=int, default=2000, help="longest prompt (default 2000)")
    p.add_argument("--snapshot-dir", default=None, help="where session snapshots are written (default: a temporary "
                   "folder removed at exit)")
    p.add_argument("--max-snapshots", type=int, default=32, help="snapshots kept; the oldest goes beyond it")
    p.add_argument("--max-snapshot-mib", type=int, default=1024, help="largest snapshot upload in MiB")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--height", type=int, default=None, help="frame height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="frame width (default: the model's)")
    p.add_argument("--window", type=int, default=-1, help="latent frames attended (default: the model's, else 12; "
                   "0: no window)")
    p.add_argument("--sink", type=int, default=None, help="first latent frames kept for good")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    from inferix.cli import _parallel_args, add_model_option_arg  # as for generate
    add_model_option_arg(p)
    _parallel_args(p.add_argument_group("one engine on several GPUs (torchrun --nproc-per-node N -m inferix serve "
                                        "--sp N; rank 0 serves the network; see docs/multi-gpu.md)"))
    r = p.add_argument_group("many engines on Ray Serve (see docs/serve.md)")
    r.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run --replicas engines behind one API on Ray Serve: on a new local Ray cluster (no "
                        "ADDRESS) or on the cluster at ADDRESS (e.g. 10.0.0.1:6379, started with `ray start --head`)")
    r.add_argument("--replicas", type=int, default=2, help="engine replicas (default 2)")
    r.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs each engine replica reserves")
    r.add_argument("--gpus-per-replica", type=float, default=0.0, help="Ray GPUs each engine replica reserves "
                   "(1 on GPU machines; default 0)")
    r.add_argument("--internal-host", default="127.0.0.1", help="where replicas listen for the router: 0.0.0.0 "
                   "on a cluster of several machines (they are guarded by an internal key)")


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="network session API (HTTP, WebSocket, WebRTC) and a web page",
                              description="Serve one engine to many clients: see docs/serve.md.")
    add_arguments(p)
    p.set_defaults(func=run)


def run(a) -> int:
    import logging

    from .serve import Manager, ServeConfig
    logging.basicConfig(level=getattr(logging, a.log_level.upper()), format="%(asctime)s %(name)s %(message)s")
    cfg = ServeConfig(model=a.model, device=a.device, height=a.height, width=a.width, window=a.window, sink=a.sink,
                      max_sessions=a.max_sessions, kv_pages=a.kv_pages, max_queue=a.max_queue,
                      max_frames=a.max_frames, idle_timeout=a.idle_timeout, max_ahead=a.max_ahead,
                      max_body_kib=a.max_body_kib, max_message_kib=a.max_message_kib,
                      max_prompt_chars=a.max_prompt_chars, snapshot_dir=a.snapshot_dir,
                      max_snapshots=a.max_snapshots, max_snapshot_mib=a.max_snapshot_mib, api_key=a.api_key or None,
                      threads=a.threads)
    from inferix.cli import model_options
    try:
        cfg.model_options = model_options(a)  # read by hub.build_engine
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not 0 < a.port < 65536:
        print(f"error: --port must be in 1..65535, got {a.port}", file=sys.stderr)
        return 2
    if a.ray is not None:
        if a.sp > 1 or a.cfg_parallel:
            print("error: --ray and --sp/--cfg-parallel do not combine yet: each replica is one process",
                  file=sys.stderr)
            return 2
        if cfg.model_options:
            print("error: --model-option does not reach Ray Serve replicas yet", file=sys.stderr)
            return 2
        return run_ray(a, cfg)
    if a.sp > 1 or a.cfg_parallel:
        return run_parallel(a, cfg)
    try:
        manager = Manager(cfg)
    except (FileNotFoundError, ValueError, TypeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.host not in ("127.0.0.1", "localhost", "::1") and cfg.api_key is None:
        print(f"note: listening on {a.host} without --api-key: anyone who can reach this address can use the "
              f"server", file=sys.stderr)
    serve(manager, a.host, a.port, log_level=a.log_level)
    return 0


def run_parallel(a, cfg) -> int:
    """``torchrun --nproc-per-node N -m inferix serve --sp N``: every rank builds its share of the engine; rank 0
    serves the network and sends each engine call to the others first (``inferix.parallel.lead_or_follow``)."""
    from inferix.parallel import ParallelError, exit_now, init_parallel, lead_or_follow

    from .hub import build_engine
    from .serve import Manager
    try:
        cfg.check()
        par = init_parallel(a.sp, a.cfg_parallel, timeout_s=a.dist_timeout)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        engine = build_engine(cfg, parallel=par)
        handle = lead_or_follow(engine)
        if handle is not None:  # rank 0; a follower returns once rank 0 closed the engine
            try:
                manager = Manager(cfg, engine=handle)
                serve(manager, a.host, a.port, log_level=a.log_level)
            finally:
                handle.close()
        par.close()  # every rank leaves the process group before it exits
    except ParallelError as e:
        print(f"error: rank {par.rank}: {e}", file=sys.stderr)
        exit_now(1)
    except (FileNotFoundError, ValueError, TypeError, KeyError) as e:
        print(f"error: rank {par.rank}: {e}", file=sys.stderr)
        exit_now(2)
    return 0


def run_ray(a, cfg) -> int:
    """``inferix serve --ray``: the Ray Serve application until SIGINT/SIGTERM."""
    import signal
    import threading
    try:
        from .serve_ray import RayOptions, build
    except ImportError as e:
        print(f"error: --ray needs Ray Serve (pip install 'ray[serve]'): {e}", file=sys.stderr)
        return 2
    opts = RayOptions(replicas=a.replicas, cpus_per_replica=a.cpus_per_replica, gpus_per_replica=a.gpus_per_replica,
                      internal_host=a.internal_host, max_queue=a.max_queue, api_key=cfg.api_key)
    try:
        opts.check()
        cfg.check()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import math

    import ray
    from ray import serve
    if a.ray == "local":  # logical CPUs: one reservation per replica, the router reserves none
        ray.init(num_cpus=max(1, math.ceil(a.replicas * a.cpus_per_replica)), include_dashboard=False,
                 log_to_driver=a.log_level == "debug")
    else:
        ray.init(address=a.ray, log_to_driver=a.log_level == "debug")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": a.host, "port": a.port})
        serve.run(build(cfg, opts), name="inferix", route_prefix="/", blocking=False)
        print(f"inferix serve: {a.replicas} engine replicas on Ray Serve at http://{a.host}:{a.port}/ "
              f"(API: /v1, metrics: /metrics)", flush=True)
        stop.wait()
        try:  # sessions end first: their clients get `end` while the proxies still run
            serve.get_app_handle("inferix").drain.remote().result(timeout_s=90)
        except Exception as e:  # noqa: BLE001 - shut down regardless
            print(f"warning: ending the sessions before shutdown failed: {e}", file=sys.stderr)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


def make_server(manager, host: str = "127.0.0.1", port: int = 0, log_level: str = "info"):
    """A uvicorn server for ``manager`` whose shutdown ends every session first (clients get ``end``)."""
    import uvicorn

    from .serve_app import make_app

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            await manager.shutdown()  # first: clients still connected get their end event
            await super().shutdown(sockets=sockets)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                try:
                    yield
                finally:  # a SIGTERM/SIGINT that shut down cleanly exits 0 (uvicorn would raise it again)
                    getattr(self, "_captured_signals", []).clear()

    cfg = manager.cfg
    config = uvicorn.Config(make_app(manager), host=host, port=port, log_level=log_level, access_log=False,
                            ws_max_size=4 * cfg.max_message_kib * 1024, timeout_graceful_shutdown=10,
                            lifespan="on")
    return Server(config)


def serve(manager, host: str, port: int, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM; sessions end cleanly (clients get ``end``) before it exits."""
    server = make_server(manager, host, port, log_level)
    print(f"inferix serve: {manager.engine.bundle.name} on http://{host}:{port}/ (API: /v1, metrics: /metrics)",
          flush=True)
    server.run()
