"""Session snapshots: one session's world state in a file, restored into an engine in this or another process.

A snapshot is one ``.safetensors`` file: the tensors (K/V of the session's pages, the noise generator's state,
latents, the decoder's stream state) plus, in the file's metadata, a JSON header (``"inferix-snapshot"``) and a
sha256 over that header and every tensor (``"sha256"``). See docs/snapshots.md. No pickle: structured state is
written as JSON that names its tensors, and only known classes are rebuilt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import OrderedDict, deque
from pathlib import Path

import torch

from .pages import AdmissionError, SavedTable
from .runner import GeneratorNoise, SessionTensors
from .scheduler import PAUSED, RUNNING, SeqState

__all__ = ["SnapshotError", "save_session", "restore_session", "read_snapshot", "model_identity", "engine_settings",
           "FORMAT", "VERSION"]

FORMAT = "inferix-snapshot"
VERSION = 2  # 2: SeqState without the unused prefill_frames counter (version 1 files still read)
READS = (1, 2)
HEADER_KEY = "inferix-snapshot"
SUM_KEY = "sha256"


class SnapshotError(ValueError):
    """A snapshot cannot be taken, or cannot be restored into this engine."""


# ---- identity and settings ------------------------------------------------------------------------
def _modules(engine) -> list:
    """(prefix, module) of every network of the model that shapes a stream: the DiT, the decoder, the bundle's
    corrector (whether the engine runs it is a setting)."""
    out = [("dit", engine.dit)]
    dec = engine.bundle.decoder
    if isinstance(dec, torch.nn.Module):
        out.append(("decoder", dec))
    elif isinstance(getattr(dec, "refiner", None), torch.nn.Module):
        out.append(("decoder.refiner", dec.refiner))
    if isinstance(engine.bundle.corrector, torch.nn.Module):
        out.append(("corrector", engine.bundle.corrector))
    return out


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def model_identity(engine) -> str:
    """sha256 over the DiT config JSON and every parameter and buffer of the DiT, the decoder and the bundle's
    corrector; computed once per engine."""
    cached = getattr(engine, "_snapshot_identity", None)
    if cached is not None:
        return cached
    h = hashlib.sha256(engine.dit.config.to_json().encode())
    for prefix, mod in _modules(engine):
        for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            h.update(f"{prefix}.{name}:{t.dtype}:{list(t.shape)}".encode())
            h.update(_tensor_bytes(t))
    engine._snapshot_identity = h.hexdigest()
    return engine._snapshot_identity


def engine_settings(engine) -> dict:
    """The engine settings a continued stream depends on (all compared on restore). ``page_groups``: the per-page
    caches the model keeps beside self-attention K/V (``KVPool.groups``), name -> one page's shape; they travel
    with the pages, so a snapshot and the engine restoring it must keep the same ones."""
    cfg = engine.dit.config
    pool = engine.pool
    return {"height": engine.height, "width": engine.width, "window": engine.window, "sink": engine.sink,
            "positions": engine.positions, "block_frames": engine.block_frames, "kv_lanes": engine.kv_lanes,
            "model_options": json.loads(json.dumps(engine.adapter.settings())),
            "sampling_steps": engine.bundle.sampling.num_steps,
            "sampling": json.loads(json.dumps(engine.bundle.sampling.to_dict())),
            "kv_dtype": str(pool.k[0].dtype), "page_tokens": pool.page_tokens, "num_layers": cfg.num_layers,
            "kv_heads": pool.k[0].shape[2], "head_dim": pool.k[0].shape[3],
            "page_groups": {name: list(t.shape[1:]) for name, t in sorted(pool.groups.items())}}


# ---- generic state <-> JSON + tensors ---------------------------------------------------------------
class _Writer:
    def __init__(self, allowed: tuple = ()):
        self.tensors: dict[str, torch.Tensor] = {}
        self.allowed = allowed  # plain classes (not dataclasses) walked by their attributes

    def tensor(self, name: str, t: torch.Tensor) -> str:
        self.tensors[name] = t.detach().to("cpu").contiguous().clone()
        return name

    def encode(self, v, where: str):
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            return {"float": repr(v)}  # exact, and nan / inf stay JSON
        if isinstance(v, torch.Tensor):
            return {"tensor": self.tensor(f"state.{len(self.tensors)}", v)}
        if isinstance(v, (list, tuple, deque)):
            items = [self.encode(x, f"{where}[{i}]") for i, x in enumerate(v)]
            return items if isinstance(v, list) else {type(v).__name__: items}
        if isinstance(v, dict):
            kind = "ordered_dict" if isinstance(v, OrderedDict) else "dict"
            for k in v:
                if k is not None and not isinstance(k, (bool, int, str)):
                    raise SnapshotError(f"{where}: a dict key of type {type(k).__name__} cannot be snapshotted")
            return {kind: [[k, self.encode(x, f"{where}[{k!r}]")] for k, x in v.items()]}
        if (dataclasses.is_dataclass(v) and not isinstance(v, type)) or type(v) in self.allowed:
            if hasattr(type(v), "__slots__") or not hasattr(v, "__dict__"):
                raise SnapshotError(f"{where}: a {type(v).__name__} without a __dict__ cannot be snapshotted")
            cls = type(v)
            return {"object": f"{cls.__module__}:{cls.__qualname__}",
                    "fields": {k: self.encode(x, f"{where}.{k}") for k, x in vars(v).items()}}
        raise SnapshotError(f"{where}: a value of type {type(v).__module__}.{type(v).__qualname__} cannot be "
                            f"snapshotted (only dataclasses, lists, tuples, dicts, tensors, numbers, str, None)")


class _Reader:
    def __init__(self, tensors: dict, device, allowed: dict):
        self.tensors, self.device, self.allowed = tensors, device, allowed  # allowed: "module:qualname" -> class

    def tensor(self, name: str, where: str) -> torch.Tensor:
        if name not in self.tensors:
            raise SnapshotError(f"{where}: tensor {name!r} is missing from the file")
        return self.tensors[name].to(self.device)

    def decode(self, v, where: str):
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, list):
            return [self.decode(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if not isinstance(v, dict) or not (len(v) == 1 or set(v) == {"object", "fields"}):
            raise SnapshotError(f"{where}: malformed value {str(v)[:60]!r}")
        tag = "object" if "object" in v else next(iter(v))
        if tag == "float":
            return float(v["float"])
        if tag == "tensor":
            return self.tensor(v["tensor"], where)
        if tag in ("tuple", "deque"):
            items = [self.decode(x, f"{where}[{i}]") for i, x in enumerate(v[tag])]
            return tuple(items) if tag == "tuple" else deque(items)
        if tag in ("dict", "ordered_dict"):
            d = OrderedDict() if tag == "ordered_dict" else {}
            for k, x in v[tag]:
                d[k] = self.decode(x, f"{where}[{k!r}]")
            return d
        if tag == "object":
            cls = self.allowed.get(v["object"])
            if cls is None:
                raise SnapshotError(f"{where}: state of class {v['object']} is not one this engine rebuilds "
                                    f"(known: {sorted(self.allowed)})")
            obj = cls.__new__(cls)
            obj.__dict__.update({k: self.decode(x, f"{where}.{k}") for k, x in v["fields"].items()})
            return obj
        raise SnapshotError(f"{where}: unknown value tag {tag!r}")


def _class_name(cls) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _decoder_stream_types(engine) -> tuple:
    dec = engine.bundle.decoder
    if dec is None:
        return ()
    probe = dec.new_stream()
    return () if probe is None else (type(probe),)


# ---- checksum ---------------------------------------------------------------------------------------------
def _checksum(header: str, tensors: dict) -> str:
    h = hashlib.sha256(header.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


# ---- save -------------------------------------------------------------------------------------------------
def save_session(sess, path) -> Path:
    """Write a session that is at a block boundary (running or paused) to ``path`` (.safetensors)."""
    from safetensors.torch import save_file
    engine = sess.engine
    path = Path(path)
    with engine.lock:
        engine._drain(wait_for=sess)  # its decoder state must have taken in every block handed to decode
        sid = sess.id
        seq = engine.scheduler.seqs.get(sid)
        if seq is None:
            raise SnapshotError(f"session {sid} has ended ({sess.status}); only a running or paused one can be "
                                f"snapshotted")
        if seq.status not in (RUNNING, PAUSED):
            raise SnapshotError(f"session {sid} is {seq.status}; only a running or paused one can be snapshotted")
        if seq.prefill_chunks:
            raise SnapshotError(f"session {sid} is still committing its given frames ({len(seq.prefill_chunks)} "
                                f"passes left); snapshot it at a block boundary (Session.at_block_boundary)")
        if not sess.at_block_boundary:
            raise SnapshotError(f"session {sid} is inside block {seq.block} (step {seq.step}); snapshot it at a "
                                f"block boundary (Session.at_block_boundary)")
        if not engine.kv.holds(sid):
            raise SnapshotError(f"session {sid} holds no KV pages yet; snapshot it once it is admitted")
        st = engine.runner.sessions[sid]
        if type(st.noise) is not GeneratorNoise:
            raise SnapshotError(f"session {sid} draws its noise from {type(st.noise).__name__}; only seeded "
                                f"GeneratorNoise can be snapshotted")
        w = _Writer(allowed=_decoder_stream_types(engine))
        # every per-page tensor (K/V of each layer, the model's cache groups) of the block table (sink then
        # window), every lane: kv.<name> [lanes, pages, ...]
        table = engine.kv.save_table(sid)
        pages = engine.kv.held_pages(sid)
        stride = engine.kv.num_pages
        if pages:
            rows = torch.tensor([p + j * stride for j in range(engine.kv_lanes) for p in pages])
            for name, pool in engine.pool.page_tensors():
                t = pool[rows.to(pool.device)]
                w.tensor(f"kv.{name}", t.reshape(engine.kv_lanes, len(pages), *t.shape[1:]))
        hist = list(st.history)
        if hist:
            w.tensor("history", torch.stack([st.history[f] for f in hist]))
        w.tensor("noise.state", st.noise.gen.get_state())
        seq_fields = {f.name: getattr(seq, f.name) for f in dataclasses.fields(SeqState)}
        header = {
            "format": FORMAT, "version": VERSION,
            "model": {"name": engine.bundle.name, "identity": model_identity(engine)},
            "engine": engine_settings(engine),
            "session": {
                "num_frames": sess.num_frames, "frames_out": sess.frames_out,
                "seq": w.encode(seq_fields, "seq"),
                "pages": dataclasses.asdict(table),
                "runner": {
                    "noise": "GeneratorNoise", "prompt": st.prompt, "negative_prompt": st.negative_prompt,
                    "history_frames": hist,
                    "x": w.encode(st.x, "x"), "x0": w.encode(st.x0, "x0"),
                    "prefill": w.encode(list(st.prefill), "prefill"),
                    "text_embeds": w.encode(st.text_embeds, "text_embeds"),
                    "inputs": w.encode(dict(st.inputs), "inputs"),
                    "decoder_state": w.encode(st.decoder_state, "decoder_state"),
                },
            },
        }
    text = json.dumps(header, sort_keys=True)
    meta = {HEADER_KEY: text, SUM_KEY: _checksum(text, w.tensors)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(w.tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ---- restore ----------------------------------------------------------------------------------------------
def read_snapshot(path) -> tuple[dict, dict]:
    """(header, tensors) of a snapshot file, checked for format, version and checksum."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no snapshot file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        msg = str(e).splitlines()[0] if str(e) else ""
        raise SnapshotError(f"{path}: not a readable snapshot file ({type(e).__name__}: {msg})") from None
    text = meta.get(HEADER_KEY)
    if text is None:
        raise SnapshotError(f"{path}: not an inferix snapshot (no {HEADER_KEY!r} header in its metadata)")
    try:
        header = json.loads(text)
    except json.JSONDecodeError as e:
        raise SnapshotError(f"{path}: the snapshot header is not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SnapshotError(f"{path}: format is {header.get('format') if isinstance(header, dict) else None!r}, "
                            f"expected {FORMAT!r}")
    if header.get("version") not in READS:
        raise SnapshotError(f"{path}: snapshot version {header.get('version')!r}; this engine reads versions "
                            f"{', '.join(map(str, READS))}")
    if meta.get(SUM_KEY) != _checksum(text, tensors):
        raise SnapshotError(f"{path}: checksum mismatch: the file was edited or damaged after it was written")
    return header, tensors


def _check_compatible(engine, header: dict, path) -> None:
    snap_model = header.get("model") or {}
    if snap_model.get("identity") != model_identity(engine):
        raise SnapshotError(f"{path}: model differs: the snapshot was made by {snap_model.get('name')!r} "
                            f"(identity {str(snap_model.get('identity'))[:12]}), this engine runs "
                            f"{engine.bundle.name!r} (identity {model_identity(engine)[:12]})")
    snap, mine = header.get("engine") or {}, engine_settings(engine)
    if "model_options" not in snap:  # older snapshots kept the model options beside the other settings
        snap = {**snap, "model_options": {k: snap[k] for k in mine["model_options"] if k in snap}}
    if "page_groups" not in snap:  # snapshots from before cache groups: pages held self-attention K/V only
        snap = {**snap, "page_groups": {}}
    for key in mine:
        if snap.get(key) != mine[key]:
            raise SnapshotError(f"{path}: {key} differs: snapshot {snap.get(key)!r}, engine {mine[key]!r}")


def restore_session(engine, path):
    """A paused Session continuing the snapshot at ``path`` in ``engine`` (``resume()`` runs it)."""
    from .engine import Session
    header, tensors = read_snapshot(path)
    _check_compatible(engine, header, path)
    try:
        s = header["session"]
        r = s["runner"]
        pg = s["pages"]
        allowed = {_class_name(c): c for c in _decoder_stream_types(engine)}
        rd = _Reader(tensors, engine.device, allowed)
        seq_fields = rd.decode(s["seq"], "seq")
        if header.get("version") == 1 and isinstance(seq_fields, dict):
            seq_fields.pop("prefill_frames", None)  # a counter version 1 kept and nothing read
        names = {f.name for f in dataclasses.fields(SeqState)}
        if not isinstance(seq_fields, dict) or set(seq_fields) != names:
            raise SnapshotError(f"{path}: the session counters do not match this engine's SeqState fields")
        table = SavedTable(budget=int(pg["budget"]), sink_frames=[int(f) for f in pg["sink_frames"]],
                           window_frames=[int(f) for f in pg["window_frames"]],
                           frames_committed=int(pg["frames_committed"]))
        frames, budget = table.frames(), table.budget
        if len(frames) > budget:
            raise SnapshotError(f"{path}: the snapshot holds {len(frames)} pages, over its budget {budget}")
        kv = {}
        if frames:
            for name, pool in engine.pool.page_tensors():
                t = rd.tensor(f"kv.{name}", "kv")
                want = (engine.kv_lanes, len(frames), *pool.shape[1:])
                if tuple(t.shape) != want:
                    raise SnapshotError(f"{path}: kv.{name} has shape {list(t.shape)}, expected {list(want)}")
                kv[name] = t.to(pool.dtype)
        hist_frames = r["history_frames"]
        hist = OrderedDict()
        if hist_frames:
            h = rd.tensor("history", "history")
            hist = OrderedDict((int(f), h[i]) for i, f in enumerate(hist_frames))
        noise = GeneratorNoise(0)
        noise.gen.set_state(tensors["noise.state"])
        if r.get("noise") != "GeneratorNoise":
            raise SnapshotError(f"{path}: noise kind {r.get('noise')!r} cannot be restored")
        st = SessionTensors(noise=noise, prompt=r["prompt"], negative_prompt=r["negative_prompt"],
                            x=rd.decode(r["x"], "x"), x0=rd.decode(r["x0"], "x0"),
                            decoder_state=rd.decode(r["decoder_state"], "decoder_state"), history=hist,
                            prefill=rd.decode(r["prefill"], "prefill"),
                            text_embeds=rd.decode(r["text_embeds"], "text_embeds"),
                            inputs=rd.decode(r["inputs"], "inputs") if "inputs" in r else {})
        num_frames, frames_out = s["num_frames"], int(s["frames_out"])
    except SnapshotError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise SnapshotError(f"{path}: malformed snapshot ({type(e).__name__}: {e})") from None
    with engine.lock:
        engine.kv.check_fits_ever(budget)
        # room is made the way admission makes it (kept prefixes, then paused sessions to host memory)
        if not engine.scheduler.make_room(budget) or engine.kv.free_pages < len(frames):
            raise AdmissionError(f"the pool cannot hold the restored session now: it needs {budget} KV pages, "
                                 f"{engine.kv.unreserved} are unreserved")
        sid = next(engine._ids)
        engine.kv.allocate(sid, budget)
        pages = engine.kv.restore_table(sid, table)
        if pages:
            stride = engine.kv.num_pages
            for name, pool in engine.pool.page_tensors():
                t = kv[name]
                for j in range(engine.kv_lanes):
                    idx = torch.tensor([p + j * stride for p in pages], device=pool.device)
                    pool[idx] = t[j].to(pool.device)
        seq = SeqState(**seq_fields)
        seq.sid, seq.status = sid, PAUSED
        engine.runner.sessions[sid] = st
        engine.scheduler.seqs[sid] = seq
        sess = Session(engine, seq, num_frames)
        sess.frames_out = frames_out
        engine.sessions[sid] = sess
        engine.profiler.session_opened(sid)
    return sess
