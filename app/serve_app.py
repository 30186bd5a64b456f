"""The ASGI application of ``inferix serve`` (docs/serve.md): routes, credentials, body limits, and the clients
that consume a session's outbox (a WebSocket, or a WebRTC peer through ``serve_webrtc``). The sessions and the
engine live in ``serve.Manager``."""
from __future__ import annotations

import asyncio
import json
import time
from collections import deque

from fastapi import Request, WebSocket  # route annotations are resolved in this module

from .serve import (STATIC, Manager, ServeError, ServeSession, _has_webrtc, _same, log,
                    redact_credentials_in_logs)

__all__ = ["make_app", "WebSocketClient", "WebRTCBridge"]


# ---- the ASGI application -----------------------------------------------------------------------------------
class _BodyLimit:
    """Pure ASGI middleware: a request body over its limit gets 413 before the route reads it all."""

    def __init__(self, app, manager: Manager):
        self.app, self.manager = app, manager

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cfg = self.manager.cfg
        upload = scope["method"] == "PUT" and scope["path"].rstrip("/") == "/v1/snapshots"
        limit = (cfg.max_snapshot_mib * 2 ** 20) if upload else cfg.max_body_kib * 1024
        what = f"--max-snapshot-mib {cfg.max_snapshot_mib}" if upload else f"--max-body-kib {cfg.max_body_kib}"
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_error(send, 413, "too_large", f"the request body has {int(length)} bytes; the "
                                                             f"limit is {limit} ({what})")
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _TooLarge(f"the request body is over {limit} bytes ({what})")
            return msg
        try:
            await self.app(scope, limited, send)
        except _TooLarge as e:
            await _send_error(send, 413, "too_large", str(e))


class _TooLarge(Exception):
    pass


async def _send_error(send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def make_app(manager: Manager):
    """The FastAPI application serving ``manager`` (the worker starts with the application)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

    cfg = manager.cfg

    @asynccontextmanager
    async def lifespan(app):
        manager.start(asyncio.get_running_loop())
        yield
        if not manager._stop.is_set():
            await manager.shutdown()

    redact_credentials_in_logs()
    app = FastAPI(title="Inferix", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.manager = manager

    @app.exception_handler(ServeError)
    async def serve_error(request, e: ServeError):
        return JSONResponse({"error": {"code": e.code, "message": e.message}}, status_code=e.status)

    def authorize(request) -> None:
        if cfg.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if not (auth.startswith("Bearer ") and _same(auth[7:].strip(), cfg.api_key)):
            raise ServeError(401, "unauthorized", "this server needs an API key: Authorization: Bearer KEY")

    def session_of(request: Request, sid: str) -> ServeSession:
        authorize(request)
        return manager.get(sid, request.headers.get("x-session-token"))

    async def json_body(request: Request):
        raw = await request.body()
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ServeError(400, "bad_json", "the body is not valid JSON") from None

    @app.get("/v1/health")
    async def health(request: Request):
        authorize(request)
        return manager.health()

    @app.get("/v1/model")
    async def model(request: Request):
        authorize(request)
        return manager.model_info()

    @app.get("/metrics")
    async def metrics(request: Request):
        authorize(request)
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(manager.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/sessions")
    async def create(request: Request):
        authorize(request)
        created = time.monotonic()
        body = await json_body(request)
        ss = await asyncio.to_thread(manager.open, body, created)
        st = ss.status()
        out = {"id": ss.id, "token": ss.token, "state": st["state"], "position": st["position"],
               "video": ss.video, "frames": st["frames"], "block": st["block"],
               "ws": f"/v1/sessions/{ss.id}/ws"}
        return JSONResponse(out, status_code=202 if st["state"] == "waiting" else 201)

    @app.post("/v1/sessions/check")
    async def check(request: Request):
        """The checks of POST /v1/sessions without opening anything (a router uses it before queueing)."""
        authorize(request)
        await asyncio.to_thread(manager.validate, await json_body(request))
        return {"ok": True}

    @app.get("/v1/sessions/{sid}")
    async def status(sid: str, request: Request):
        return session_of(request, sid).status()

    @app.delete("/v1/sessions/{sid}")
    async def delete(sid: str, request: Request):
        ss = session_of(request, sid)
        await asyncio.to_thread(manager.delete, ss)
        return {"id": ss.id, "state": "cancelled"}

    @app.post("/v1/sessions/{sid}/fork")
    async def fork(sid: str, request: Request):
        ss = session_of(request, sid)
        return JSONResponse(await manager.boundary_job(ss, "fork"), status_code=201)

    @app.post("/v1/sessions/{sid}/snapshot")
    async def snapshot(sid: str, request: Request):
        ss = session_of(request, sid)
        return JSONResponse(await manager.boundary_job(ss, "snapshot"), status_code=201)

    @app.get("/v1/snapshots/{snap}")
    async def get_snapshot(snap: str, request: Request):
        authorize(request)
        return FileResponse(manager.snapshot_path(snap), media_type="application/octet-stream",
                            filename=f"{snap}.safetensors")

    @app.put("/v1/snapshots")
    async def put_snapshot(request: Request):
        authorize(request)
        data = await request.body()
        if not data:
            raise ServeError(400, "bad_value", "the body is empty; send the snapshot file's bytes")
        return JSONResponse({"snapshot": await asyncio.to_thread(manager.upload_snapshot, data)}, status_code=201)

    @app.delete("/v1/snapshots/{snap}")
    async def delete_snapshot(snap: str, request: Request):
        authorize(request)
        path = manager.snapshot_path(snap)
        manager.snapshots.pop(snap, None)
        path.unlink(missing_ok=True)
        return {"snapshot": snap, "deleted": True}

    @app.post("/v1/sessions/{sid}/webrtc")
    async def webrtc(sid: str, request: Request):
        ss = session_of(request, sid)
        body = await json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("sdp"), str) or body.get("type") != "offer":
            raise ServeError(400, "bad_value", 'the body must be {"sdp": "...", "type": "offer"}')
        if not _has_webrtc():
            raise ServeError(501, "not_allowed", "WebRTC needs the aiortc package on the server")
        from .serve_webrtc import OfferError, answer_offer
        if ss.ended is not None and not any(i[0] in ("block", "end") for i in ss.outbox):
            raise ServeError(409, "not_allowed", f"session {ss.id} has ended ({ss.ended})")
        try:
            return await answer_offer(WebRTCBridge(manager, ss), body["sdp"], body["type"],
                                      max_message_bytes=cfg.max_message_kib * 1024)
        except OfferError as e:
            raise ServeError(400, "bad_value", str(e)) from None

    @app.websocket("/v1/sessions/{sid}/ws")
    async def ws(websocket: WebSocket, sid: str):
        await websocket.accept()
        q = websocket.query_params
        try:
            if cfg.api_key is not None:
                auth = websocket.headers.get("authorization", "")
                key = auth[7:].strip() if auth.startswith("Bearer ") else q.get("key")
                if not _same(key, cfg.api_key):
                    raise ServeError(401, "unauthorized", "this server needs an API key: ?key=KEY or a Bearer "
                                                          "header")
            ss = manager.get(sid, q.get("token") or websocket.headers.get("x-session-token"))
            if ss.ended is not None and not any(i[0] in ("block", "end") for i in ss.outbox):
                # (else its last frames and its end are still to send)
                raise ServeError(409, "not_allowed", f"session {sid} has ended ({ss.ended})")
        except ServeError as e:
            await websocket.send_json({"type": "error", "code": e.code, "message": e.message})
            await websocket.close(code=4000 + e.status)
            return
        await WebSocketClient(manager, ss, websocket).run()

    index = STATIC / "index.html"

    @app.get("/")
    async def page():
        if index.exists():
            return FileResponse(index)
        return HTMLResponse("<h1>Inferix</h1><p>The API is under <code>/v1</code> (see docs/serve.md).</p>")

    if STATIC.is_dir():
        from fastapi.staticfiles import StaticFiles
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(_BodyLimit, manager=manager)
    return app


class _Client:
    """A connection that consumes a session's outbox: attach (taking over from another), pump, detach."""

    def __init__(self, manager: Manager, ss: ServeSession):
        self.manager, self.ss = manager, ss
        self.closed = False

    def attach(self) -> None:
        ss = self.ss
        old = ss.client
        ss.client = self
        if old is not None:
            old.replaced()
        ss.state_key = ss.key()  # the new client gets the state now; later changes come from the worker
        for item in [i for i in ss.outbox if i[0] == "event" and i[1]["type"] == "state"]:
            ss.outbox.remove(item)  # older states nobody saw
        ss.outbox.appendleft(("event", ss.state_event()))  # first: before blocks made while nobody was connected
        ss.wake.set()

    def detach(self) -> None:
        if self.ss.client is self:
            self.ss.client = None
            self.ss.detached_at = time.monotonic()

    def replaced(self) -> None:  # another connection took the session
        self.closed = True


class WebSocketClient(_Client):
    def __init__(self, manager: Manager, ss: ServeSession, ws):
        super().__init__(manager, ss)
        self.ws = ws
        self.send_lock = asyncio.Lock()
        self.encoder = None
        self.limit = manager.cfg.max_message_kib * 1024

    async def send(self, event: dict) -> None:
        async with self.send_lock:
            await self.ws.send_text(json.dumps(event))

    def replaced(self) -> None:
        super().replaced()
        asyncio.ensure_future(self._close_replaced())

    async def _close_replaced(self) -> None:
        try:
            await self.send({"type": "end", "reason": "replaced", "frames": self.ss.frames})
            await self.ws.close(code=4001)
        except Exception:  # noqa: BLE001 - the old connection may be gone already
            pass

    async def run(self) -> None:
        self.attach()
        eng = self.manager.engine
        ss = self.ss
        if ss.video == "fmp4":
            from .serve_media import FMP4Encoder
            self.encoder = FMP4Encoder(eng.width, eng.height, eng.fps)
        writer = asyncio.ensure_future(self._write())
        try:
            await self._read()
        finally:
            self.closed = True
            writer.cancel()
            try:
                await writer
            except BaseException:  # noqa: BLE001 - cancelled or failed with the connection
                pass
            self.detach()
            if self.encoder is not None:
                self.encoder.close()

    async def _read(self) -> None:
        from starlette.websockets import WebSocketDisconnect
        while not self.closed:
            try:
                msg = await self.ws.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if msg["type"] == "websocket.disconnect":
                return
            text = msg.get("text")
            if text is None:
                await self.send({"type": "error", "code": "bad_message",
                                 "message": "binary messages are not accepted; send JSON text"})
                continue
            if len(text.encode()) > self.limit:
                await self.send({"type": "error", "code": "too_large", "message": f"the message has "
                                 f"{len(text.encode())} bytes; the limit is {self.limit} (--max-message-kib)"})
                continue
            try:
                data = json.loads(text)
            except ValueError:
                await self.send({"type": "error", "code": "bad_json", "message": "the message is not valid JSON"})
                continue
            if not isinstance(data, dict):
                await self.send({"type": "error", "code": "bad_message",
                                 "message": "a control message is a JSON object with a 'type'"})
                continue
            if not await self.manager.control(self.ss, data, self.send):
                # closed by the client: the end event follows from the writer
                await asyncio.sleep(0)
                continue

    async def _write(self) -> None:
        ss, eng = self.ss, self.manager.engine
        try:
            if ss.video == "jpeg":  # fmp4: once the codec is known, before the init segment
                await self.send({"type": "media", "video": "jpeg", "width": eng.width, "height": eng.height,
                                 "fps": eng.fps})
            while not self.closed:
                item = await ss.next_item()
                if item[0] == "event":
                    await self.send(item[1])
                elif item[0] == "block":
                    await self._send_block(item[1], item[2])
                else:  # end
                    await self.send(item[1])
                    self.closed = True
                    await self.ws.close(code=1000)
                    return
        except Exception:  # noqa: BLE001 - a broken connection ends only this client
            log.debug("websocket writer of session %s ended", ss.id, exc_info=True)
            self.closed = True
            try:
                await self.ws.close(code=1011)
            except Exception:  # noqa: BLE001
                pass

    async def _send_block(self, meta: dict, frames) -> None:
        ss = self.ss
        try:
            if self.encoder is not None:
                first = self.encoder.init is None
                pieces = await asyncio.to_thread(self.encoder.encode, frames)
                if first:
                    await self.send({"type": "media", "video": "fmp4", "codec": self.encoder.codec,
                                     "mime": self.encoder.mime, "width": self.encoder.width,
                                     "height": self.encoder.height, "fps": self.encoder.fps})
            else:
                from .serve_media import jpeg_frames
                pieces = await asyncio.to_thread(jpeg_frames, frames)
            async with self.send_lock:
                await self.ws.send_text(json.dumps(meta))
                for p in pieces:
                    await self.ws.send_bytes(p)
        finally:
            ss.block_sent()


class WebRTCBridge(_Client):
    """One WebRTC peer as a session's client (``serve_webrtc.SessionBridge``): events go to the data channel at
    once; blocks wait for the video track, and count as sent when it takes them (backpressure)."""

    def __init__(self, manager: Manager, ss: ServeSession):
        super().__init__(manager, ss)
        eng = manager.engine
        self.fps, self.width, self.height = eng.fps, eng.width, eng.height
        self.blocks: deque = deque()  # blocks taken from the outbox that the track has not taken yet
        self.more = asyncio.Event()
        self.pump: asyncio.Task | None = None
        self.send_event = self.on_detach = None

    def attach(self, send_event, on_detach) -> None:
        self.send_event, self.on_detach = send_event, on_detach
        super().attach()
        self.pump = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        while not self.closed:
            item = await self.ss.next_item()
            if item[0] == "event":
                self.send_event(item[1])
            elif item[0] == "block":
                self.blocks.append(item)
            else:  # end: the track ends after the blocks before it
                self.send_event(item[1])
                self.blocks.append(None)
                self.closed = True
            self.more.set()

    async def next_block(self):
        while not self.blocks:
            self.more.clear()
            await self.more.wait()
        item = self.blocks.popleft()
        if item is None:
            return None
        self.ss.block_sent()
        return item[1], item[2]

    async def handle_control(self, msg: dict, reply) -> None:
        async def send(event):
            reply(event)
        await self.manager.control(self.ss, msg, send)

    def replaced(self) -> None:
        super().replaced()
        self.send_event({"type": "end", "reason": "replaced", "frames": self.ss.frames})
        self._stop()
        self.on_detach()

    def _stop(self) -> None:
        if self.pump is not None:
            self.pump.cancel()
        for item in reversed([b for b in self.blocks if b is not None]):
            self.ss.outbox.appendleft(item)  # blocks the track never took stay for the next client
        self.blocks.clear()

    def detach(self) -> None:
        self.closed = True
        self._stop()
        super().detach()
