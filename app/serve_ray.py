"""``inferix serve --ray``: many engine replicas behind one session API, on Ray Serve.

Layout (docs/serve.md, "Many engines on Ray Serve"):
- ``EngineReplica`` deployments ``engine0`` ... ``engineN-1``, one replica each (so each is addressable): every one
  owns a ``Manager`` (an engine and its worker thread) and serves the single-engine API of ``inferix serve`` on an
  internal port, guarded by an internal key only the router knows. Ray Serve health-checks and restarts them.
- ``Router``, the ingress (one replica; it holds the admission queue): the public HTTP/WebSocket API, the same
  contract as ``inferix serve``. A new session goes to the replica with the most free KV pages that can admit it;
  when none can, it waits in the router's queue with its position and is placed as soon as any replica has room.
  A placed session's public id is ``<replica>-<id on the replica>``, so every later request of it (HTTP, WebSocket,
  fork, snapshot, WebRTC offer) is sent to its replica; a fork lands there too (it shares the parent's pages).
  WebRTC media flows from the replica straight to the client (the router only relays the offer and the answer).
- When a replica dies, the WebSocket of each of its sessions gets an ``error`` (``replica_lost``) and an ``end``
  event and is closed; other sessions go on; new sessions go to live replicas; Ray Serve starts a new replica.
"""
import asyncio
import json
import logging
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, field

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from ray import serve

from .serve import STATIC, ServeConfig, ServeError, _same

__all__ = ["EngineReplica", "Router", "build", "build_app", "RayOptions"]

log = logging.getLogger("inferix.serve.ray")

router_app = FastAPI(title="Inferix (Ray Serve)", docs_url=None, redoc_url=None, openapi_url=None)


@dataclass
class RayOptions:
    replicas: int = 2
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    internal_host: str = "127.0.0.1"  # where replicas listen for the router: 0.0.0.0 on a cluster of machines
    max_queue: int = 16
    api_key: str | None = None

    def check(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"replicas must be an int >= 1, got {self.replicas!r}")
        for name in ("cpus_per_replica", "gpus_per_replica"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name.replace('_', '-')} must be a number >= 0, got {v!r}")


# ---- one engine ----------------------------------------------------------------------------------------------
@serve.deployment(max_ongoing_requests=1000, health_check_period_s=2, health_check_timeout_s=15,
                  graceful_shutdown_timeout_s=20)
class EngineReplica:
    """One engine (a ``Manager``) serving the single-engine API on an internal port."""

    def __init__(self, index: int, config: dict, internal_key: str, internal_host: str = "127.0.0.1"):
        import ray

        from .serve import Manager
        from .serve_cli import make_server
        self.index = index
        cfg = ServeConfig(**dict(config, api_key=internal_key))
        self.manager = Manager(cfg)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((internal_host, 0))
        port = sock.getsockname()[1]
        host = ray.util.get_node_ip_address() if internal_host in ("0.0.0.0", "") else internal_host
        self.url = f"http://{host}:{port}"
        self.server = make_server(self.manager, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name=f"inferix-engine{index}-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"engine replica {index}: its HTTP server did not start")
            time.sleep(0.05)
        log.info("engine replica %d serves %s", index, self.url)

    def address(self) -> str:
        return self.url

    def check_health(self) -> None:
        """Ray Serve calls this every few seconds; raising makes it replace the replica."""
        if not self.thread.is_alive():
            raise RuntimeError(f"engine replica {self.index}: its HTTP server stopped")
        if not self.manager.alive:
            raise RuntimeError(f"engine replica {self.index}: its engine worker stopped")

    def drain(self) -> None:
        """End every session (clients get ``end`` with reason server_shutdown); the replica stays up."""
        loop = self.manager.loop
        if loop is not None and not loop.is_closed() and not self.manager._stop.is_set():
            asyncio.run_coroutine_threadsafe(self.manager.shutdown(), loop).result(60)

    def __del__(self):  # Ray Serve's graceful shutdown: end the sessions (clients get `end`), stop the server
        server = getattr(self, "server", None)
        if server is not None:
            server.should_exit = True
            self.thread.join(20)


def merge_metrics(texts: dict, replicas: int, queued: int) -> bytes:
    """The replicas' Prometheus metrics as one exposition: every sample gains a ``replica`` label; plus the
    router's own gauges."""
    from prometheus_client.parser import text_string_to_metric_families
    families: dict = {}
    for k, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            f = families.setdefault(fam.name, (fam.type, fam.documentation, []))
            for s in fam.samples:
                f[2].append((s.name, dict(s.labels, replica=str(k)), s.value))
    lines = []
    for name, (kind, doc, samples) in families.items():
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {kind}")
        for sname, labels, value in samples:
            lab = ",".join(f'{a}="{b}"' for a, b in labels.items())
            lines.append(f"{sname}{{{lab}}} {value}")
    lines += ["# HELP inferix_replicas Engine replicas configured", "# TYPE inferix_replicas gauge",
              f"inferix_replicas {replicas}", "# HELP inferix_replicas_up Engine replicas answering",
              "# TYPE inferix_replicas_up gauge", f"inferix_replicas_up {len(texts)}",
              "# HELP inferix_router_waiting Sessions waiting in the router for a replica with free pages",
              "# TYPE inferix_router_waiting gauge", f"inferix_router_waiting {queued}"]
    return ("\n".join(lines) + "\n").encode()


# ---- the router ----------------------------------------------------------------------------------------------
@dataclass
class Queued:
    """A session waiting in the router for a replica with free pages."""
    id: str
    token: str
    body: dict
    created: float
    placed: asyncio.Event = field(default_factory=asyncio.Event)
    target: tuple | None = None  # (replica, id there, token there) once placed
    error: dict | None = None  # why it could not be placed


@serve.deployment(max_ongoing_requests=10000, num_replicas=1)
@serve.ingress(router_app)
class Router:
    def __init__(self, engines: list, options: dict, internal_key: str):
        import httpx
        self.engines = engines  # DeploymentHandles, one per engine replica
        self.opt = RayOptions(**options)
        self.key = internal_key
        self.urls: dict[int, str] = {}
        self.queue: list[Queued] = []
        self.queued: dict[str, Queued] = {}  # waiting or placed, by public id
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=3.0))
        self.pump: asyncio.Task | None = None

    # -- replicas
    async def url(self, k: int, refresh: bool = False) -> str:
        if refresh or k not in self.urls:
            self.urls[k] = await asyncio.wait_for(self.engines[k].address.remote(), 15)
        return self.urls[k]

    async def call(self, k: int, method: str, path: str, token: str | None = None, **kw):
        """A request to replica k (its address is looked up again once if the old one is gone)."""
        import httpx
        headers = {"Authorization": f"Bearer {self.key}"}
        if token is not None:
            headers["X-Session-Token"] = token
        for attempt in (0, 1):
            try:
                base = await self.url(k, refresh=attempt == 1)
                return await self.http.request(method, base + path, headers=headers, **kw)
            except (httpx.TransportError, asyncio.TimeoutError) as e:
                if attempt == 1:
                    raise ServeError(503, "replica_lost", f"engine replica {k} is not reachable: "
                                                          f"{type(e).__name__}") from None
            except Exception as e:  # noqa: BLE001 - a dead replica's handle raises Ray errors
                if attempt == 1:
                    raise ServeError(503, "replica_lost", f"engine replica {k} is down: {type(e).__name__}") from None

    async def loads(self) -> list:
        async def one(k):
            try:
                r = await asyncio.wait_for(self.call(k, "GET", "/v1/health"), 5)
                return r.json() if r.status_code == 200 else None
            except Exception:  # noqa: BLE001 - a replica that does not answer is not up
                return None
        return list(await asyncio.gather(*(one(k) for k in range(len(self.engines)))))

    @staticmethod
    def pick(loads: list) -> int | None:
        """The replica with the most free KV pages among those that can admit a session now."""
        ok = [(ld["kv_pages_free"], -k, k) for k, ld in enumerate(loads) if ld and ld.get("can_admit")]
        return max(ok)[2] if ok else None

    # -- ids
    def resolve(self, sid: str, token: str | None):
        """(replica, id there, token there) of a public session id, or the Queued record of a waiting one."""
        if sid.startswith("q-"):
            q = self.queued.get(sid)
            if q is None:
                raise ServeError(404, "not_found", f"no session {sid!r}")
            if not _same(token, q.token):
                raise ServeError(403, "forbidden", "this session needs its own token (X-Session-Token or ?token=)")
            return q.target or q
        k, _, inner = sid.partition("-")
        if not k.isdigit() or int(k) >= len(self.engines) or not inner:
            raise ServeError(404, "not_found", f"no session {sid!r}")
        if token is None:
            raise ServeError(403, "forbidden", "this session needs its own token (X-Session-Token or ?token=)")
        return int(k), inner, token

    @staticmethod
    def public(k: int, body: dict) -> dict:
        """A replica's answer with its ids made public (prefixed with the replica)."""
        out = dict(body)
        for name in ("id", "parent", "snapshot"):
            if isinstance(out.get(name), str):
                out[name] = f"{k}-{out[name]}"
        if isinstance(out.get("ws"), str) and "id" in out:
            out["ws"] = f"/v1/sessions/{out['id']}/ws"
        return out

    def authorize(self, request) -> None:
        key = self.opt.api_key
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        if not (auth.startswith("Bearer ") and _same(auth[7:].strip(), key)):
            raise ServeError(401, "unauthorized", "this server needs an API key: Authorization: Bearer KEY")

    @staticmethod
    def answer(r) -> Response:
        return Response(r.content, status_code=r.status_code, media_type=r.headers.get("content-type"))

    def error(self, e: ServeError) -> JSONResponse:
        return JSONResponse({"error": {"code": e.code, "message": e.message}}, status_code=e.status)

    # -- the queue
    def position(self, q: Queued) -> int | None:
        return self.queue.index(q) if q in self.queue else None

    def ensure_pump(self) -> None:
        if self.pump is None or self.pump.done():
            self.pump = asyncio.ensure_future(self.place_waiting())

    async def place_waiting(self) -> None:
        """Place queued sessions, oldest first, whenever a replica can admit one."""
        while self.queue:
            k = self.pick(await self.loads())
            if k is None:
                await asyncio.sleep(0.2)
                continue
            q = self.queue[0]
            try:
                r = await self.call(k, "POST", "/v1/sessions", json=q.body)
            except ServeError:
                await asyncio.sleep(0.2)
                continue
            if r.status_code == 503:  # taken meanwhile: try again
                await asyncio.sleep(0.1)
                continue
            self.queue.pop(0)
            if r.status_code in (201, 202):
                d = r.json()
                q.target = (k, d["id"], d["token"])
            else:
                q.error = (r.json() or {}).get("error") or {"code": "failed", "message": r.text[:200]}
            q.placed.set()

    async def drain(self) -> None:
        """Before the application stops: every session ends and its client gets ``end`` (server_shutdown)."""
        for q in list(self.queue):
            q.error = {"code": "server_shutdown", "message": "the server is shutting down"}
            q.placed.set()
        self.queue.clear()
        await asyncio.gather(*(asyncio.wait_for(e.drain.remote(), 60) for e in self.engines),
                             return_exceptions=True)
        await asyncio.sleep(0.5)  # the relays pass the end events on

    # -- HTTP routes
    @router_app.get("/v1/health")
    async def health(self, request: Request):
        try:
            self.authorize(request)
        except ServeError as e:
            return self.error(e)
        loads = await self.loads()
        up = [ld for ld in loads if ld]
        return {"status": "ok" if up else "down", "replicas": len(loads), "replicas_up": len(up),
                "sessions": sum(ld["sessions"] for ld in up) + len(self.queue),
                "waiting": len(self.queue) + sum(ld["waiting"] for ld in up),
                "kv_pages_used": sum(ld["kv_pages_used"] for ld in up),
                "kv_pages_total": sum(ld["kv_pages_total"] for ld in up),
                "kv_pages_free": sum(ld["kv_pages_free"] for ld in up),
                "can_admit": self.pick(loads) is not None and not self.queue,
                "by_replica": [dict(ld, replica=k) if ld else {"replica": k, "status": "down"}
                               for k, ld in enumerate(loads)]}

    @router_app.get("/v1/model")
    async def model(self, request: Request):
        try:
            self.authorize(request)
            for k in range(len(self.engines)):
                try:
                    r = await self.call(k, "GET", "/v1/model")
                except ServeError:
                    continue
                return dict(r.json(), replicas=len(self.engines))
            raise ServeError(503, "replica_lost", "no engine replica is up")
        except ServeError as e:
            return self.error(e)

    @router_app.get("/metrics")
    async def metrics(self, request: Request):
        try:
            self.authorize(request)
        except ServeError as e:
            return self.error(e)
        texts = {}
        for k in range(len(self.engines)):
            try:
                r = await self.call(k, "GET", "/metrics")
                texts[k] = r.text
            except ServeError:
                pass
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(merge_metrics(texts, len(self.engines), len(self.queue)), media_type=CONTENT_TYPE_LATEST)

    @router_app.post("/v1/sessions")
    async def create(self, request: Request):
        try:
            self.authorize(request)
            try:
                body = json.loads(await request.body() or b"{}")
            except ValueError:
                raise ServeError(400, "bad_json", "the body is not valid JSON") from None
            if not isinstance(body, dict):
                raise ServeError(400, "bad_value", "the body must be a JSON object")
            snap = body.get("snapshot")
            if snap is not None:  # it opens where the snapshot is kept
                k, inner, _ = self.resolve(str(snap), "")
                r = await self.call(k, "POST", "/v1/sessions", json=dict(body, snapshot=inner))
                return JSONResponse(self.public(k, r.json()), status_code=r.status_code)
            loads = await self.loads()
            if not any(loads):
                raise ServeError(503, "replica_lost", "no engine replica is up")
            k = None if self.queue else self.pick(loads)
            if k is not None:
                r = await self.call(k, "POST", "/v1/sessions", json=body)
                if r.status_code != 503:
                    return JSONResponse(self.public(k, r.json()), status_code=r.status_code)
            # every replica is full: wait in the router's queue (checked by a replica first, so a bad request
            # is refused now and not when it is placed)
            if len(self.queue) >= self.opt.max_queue:
                raise ServeError(503, "busy", f"every replica is full and {len(self.queue)} session(s) wait already, "
                                              f"the most allowed to wait (--max-queue {self.opt.max_queue})")
            up = next(k for k, ld in enumerate(loads) if ld)
            check = await self.call(up, "POST", "/v1/sessions/check", json=body)
            if check.status_code != 200:
                return self.answer(check)
            q = Queued(id="q-" + secrets.token_hex(12), token=secrets.token_urlsafe(32), body=body,
                       created=time.monotonic())
            self.queue.append(q)
            self.queued[q.id] = q
            self.ensure_pump()
            return JSONResponse({"id": q.id, "token": q.token, "state": "waiting", "position": self.position(q),
                                 "video": body.get("video", "fmp4"), "frames": 0, "block": 0,
                                 "ws": f"/v1/sessions/{q.id}/ws"}, status_code=202)
        except ServeError as e:
            return self.error(e)

    async def session_call(self, request: Request, sid: str, method: str, suffix: str = "", **kw):
        try:
            self.authorize(request)
            target = self.resolve(sid, request.headers.get("x-session-token"))
            if isinstance(target, Queued):
                return await self.queued_call(target, method, suffix)
            k, inner, token = target
            r = await self.call(k, method, f"/v1/sessions/{inner}{suffix}", token=token, **kw)
            if "json" not in r.headers.get("content-type", ""):
                return self.answer(r)
            body = r.json()
            if r.status_code < 300 and isinstance(body, dict):
                body = self.public(k, body)
                if sid.startswith("q-") and body.get("id") == f"{k}-{inner}":
                    body["id"] = sid  # a placed queued session keeps its public id
            return JSONResponse(body, status_code=r.status_code)
        except ServeError as e:
            return self.error(e)

    async def queued_call(self, q: Queued, method: str, suffix: str):
        if method == "GET" and not suffix:
            return {"id": q.id, "state": "waiting" if q.error is None else "failed", "position": self.position(q),
                    "paused": False, "throttled": False, "frames": 0, "block": 0, "pages": 0, "clients": 0,
                    "error": q.error}
        if method == "DELETE" and not suffix:
            if q in self.queue:
                self.queue.remove(q)
            self.queued.pop(q.id, None)
            q.error = {"code": "cancelled", "message": "cancelled while waiting"}
            q.placed.set()
            return {"id": q.id, "state": "cancelled"}
        raise ServeError(409, "not_allowed", f"session {q.id} waits for KV pages; it can do that once it runs")

    @router_app.get("/v1/sessions/{sid}")
    async def status(self, sid: str, request: Request):
        return await self.session_call(request, sid, "GET")

    @router_app.delete("/v1/sessions/{sid}")
    async def delete(self, sid: str, request: Request):
        return await self.session_call(request, sid, "DELETE")

    @router_app.post("/v1/sessions/{sid}/fork")
    async def fork(self, sid: str, request: Request):
        return await self.session_call(request, sid, "POST", "/fork")

    @router_app.post("/v1/sessions/{sid}/snapshot")
    async def snapshot(self, sid: str, request: Request):
        return await self.session_call(request, sid, "POST", "/snapshot")

    @router_app.post("/v1/sessions/{sid}/webrtc")
    async def webrtc(self, sid: str, request: Request):
        return await self.session_call(request, sid, "POST", "/webrtc", content=await request.body())

    @router_app.get("/v1/snapshots/{snap}")
    async def get_snapshot(self, snap: str, request: Request):
        try:
            self.authorize(request)
            k, inner, _ = self.resolve(snap, "")
            return self.answer(await self.call(k, "GET", f"/v1/snapshots/{inner}"))
        except ServeError as e:
            return self.error(e)

    @router_app.delete("/v1/snapshots/{snap}")
    async def delete_snapshot(self, snap: str, request: Request):
        try:
            self.authorize(request)
            k, inner, _ = self.resolve(snap, "")
            r = await self.call(k, "DELETE", f"/v1/snapshots/{inner}")
            return JSONResponse(self.public(k, r.json()), status_code=r.status_code)
        except ServeError as e:
            return self.error(e)

    @router_app.put("/v1/snapshots")
    async def put_snapshot(self, request: Request):
        try:
            self.authorize(request)
            loads = await self.loads()
            ok = [(ld["kv_pages_free"], k) for k, ld in enumerate(loads) if ld]
            if not ok:
                raise ServeError(503, "replica_lost", "no engine replica is up")
            k = max(ok)[1]
            r = await self.call(k, "PUT", "/v1/snapshots", content=await request.body())
            body = r.json()
            return JSONResponse(self.public(k, body) if r.status_code < 300 else body, status_code=r.status_code)
        except ServeError as e:
            return self.error(e)

    @router_app.get("/")
    async def page(self):
        index = STATIC / "index.html"
        if index.exists():
            return FileResponse(index)
        return HTMLResponse("<h1>Inferix</h1><p>The API is under <code>/v1</code>.</p>")

    @router_app.get("/static/{name}")
    async def static(self, name: str):
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file():
            return JSONResponse({"error": {"code": "not_found", "message": f"no file {name!r}"}}, status_code=404)
        return FileResponse(path)

    # -- WebSocket relay
    @router_app.websocket("/v1/sessions/{sid}/ws")
    async def ws(self, websocket: WebSocket, sid: str):
        await websocket.accept()
        q = websocket.query_params
        try:
            if self.opt.api_key is not None:
                auth = websocket.headers.get("authorization", "")
                key = auth[7:].strip() if auth.startswith("Bearer ") else q.get("key")
                if not _same(key, self.opt.api_key):
                    raise ServeError(401, "unauthorized", "this server needs an API key: ?key=KEY or a Bearer header")
            target = self.resolve(sid, q.get("token") or websocket.headers.get("x-session-token"))
            if isinstance(target, Queued):
                target = await self.wait_placed(websocket, target)
                if target is None:
                    return
        except ServeError as e:
            await websocket.send_json({"type": "error", "code": e.code, "message": e.message})
            await websocket.close(code=4000 + e.status)
            return
        await self.relay(websocket, *target)

    async def wait_placed(self, websocket: WebSocket, q: Queued):
        """Tell a queued session's client its position until a replica takes it; None when it never will."""
        last = None
        while not q.placed.is_set():
            pos = self.position(q)
            if pos != last:
                last = pos
                await websocket.send_json({"type": "state", "state": "waiting", "position": pos, "paused": False,
                                           "throttled": False})
            try:
                await asyncio.wait_for(q.placed.wait(), 0.25)
            except asyncio.TimeoutError:
                pass
        if q.error is not None:
            await websocket.send_json({"type": "error", **q.error})
            code = q.error.get("code")
            await websocket.send_json({"type": "end", "reason": code if code in ("cancelled", "server_shutdown")
                                       else "failed", "frames": 0})
            await websocket.close(code=1000)
            return None
        return q.target

    async def relay(self, websocket: WebSocket, k: int, inner: str, token: str) -> None:
        """Pump one session's WebSocket between the client and its replica; a lost replica ends it with an error."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed
        from starlette.websockets import WebSocketDisconnect
        try:
            base = await self.url(k)
            up = await connect(base.replace("http://", "ws://") + f"/v1/sessions/{inner}/ws?token={token}"
                               f"&key={self.key}", max_size=None, open_timeout=10, ping_interval=5, ping_timeout=10)
        except Exception as e:  # noqa: BLE001 - the replica is gone or restarting
            await websocket.send_json({"type": "error", "code": "replica_lost",
                                       "message": f"engine replica {k} is not reachable: {type(e).__name__}"})
            await websocket.send_json({"type": "end", "reason": "failed", "frames": 0})
            await websocket.close(code=1011)
            self.urls.pop(k, None)
            return
        ended = False

        async def down():  # replica -> client
            nonlocal ended
            try:
                async for m in up:
                    if isinstance(m, bytes):
                        await websocket.send_bytes(m)
                        continue
                    e = json.loads(m)
                    if e.get("type") in ("forked", "snapshot"):
                        e = self.public(k, e)
                    if e.get("type") == "end":
                        ended = True
                    await websocket.send_text(json.dumps(e))
            except ConnectionClosed:
                pass
            if not ended:  # the replica went away mid-stream
                self.urls.pop(k, None)
                await websocket.send_json({"type": "error", "code": "replica_lost",
                                           "message": f"engine replica {k} was lost; this session has ended"})
                await websocket.send_json({"type": "end", "reason": "failed", "frames": None})

        async def upward():  # client -> replica
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                if msg.get("text") is not None:
                    await up.send(msg["text"])
                elif msg.get("bytes") is not None:
                    await up.send(msg["bytes"])

        tasks = [asyncio.ensure_future(down()), asyncio.ensure_future(upward())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await up.close()
            try:
                await websocket.close(code=1000)
            except Exception:  # noqa: BLE001 - already closed
                pass


def build(config: ServeConfig, options: RayOptions):
    """The Ray Serve application: ``options.replicas`` engine deployments and the router."""
    config.check()
    options.check()
    key = secrets.token_urlsafe(32)  # the replicas' internal API key; only the router holds it
    cfg = {k: v for k, v in asdict(config).items() if k != "api_key"}
    cfg["mirrors"] = tuple(cfg.get("mirrors") or ())
    engines = []
    for k in range(options.replicas):
        dep = EngineReplica.options(name=f"engine{k}", num_replicas=1,
                                    ray_actor_options={"num_cpus": options.cpus_per_replica,
                                                       "num_gpus": options.gpus_per_replica})
        engines.append(dep.bind(k, cfg, key, options.internal_host))
    opts = asdict(options)
    return Router.options(ray_actor_options={"num_cpus": 0}).bind(engines, opts, key)


def build_app(args: dict):
    """Application builder for operators: ``serve run inferix.app.serve_ray:build_app replicas=2 model=tiny``
    or a Serve config file (docs/serve.md). Keys: the ServeConfig and RayOptions field names."""
    import dataclasses
    conf_fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    opt_fields = {f.name: f for f in dataclasses.fields(RayOptions)}
    conf, opts = {}, {}
    for key, value in (args or {}).items():
        name = key.replace("-", "_")
        f = conf_fields.get(name) or opt_fields.get(name)
        if f is None:
            raise ValueError(f"unknown argument {key!r}; known: {sorted(set(conf_fields) | set(opt_fields))}")
        value = _parse(value, f.type)
        (opts if name in opt_fields else conf)[name] = value
    if "api_key" in conf:
        opts["api_key"] = conf.pop("api_key")
    if "max_queue" in conf:
        opts["max_queue"] = conf["max_queue"]
    return build(ServeConfig(**conf), RayOptions(**opts))


def _parse(value, kind):
    if not isinstance(value, str):
        return value
    kind = str(kind)
    if value.lower() in ("none", "null"):
        return None
    if "int" in kind and "float" not in kind:
        return int(value)
    if "float" in kind:
        return float(value)
    return value

