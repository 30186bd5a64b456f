"""Evaluate many videos (in parallel, failures isolated) and generate-then-evaluate LV-Bench prompts."""
from __future__ import annotations

import json
import math
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np
from tqdm import tqdm

from inferix.drift import DEFAULT_NUM_CHUNKS, METRIC_NAMES

from .backends import build_scorers
from .groundtruth import GroundTruthHook
from .video import Mp4Writer, VideoInfo, VideoReadError, iter_frames, probe_video, read_video
from .vde import FrameCountError, TooShortError, score_stream, score_video

SAMPLE_PROMPTS = os.path.join(os.path.dirname(__file__), "prompts", "sample.jsonl")

DEFAULT_MAX_MEMORY_GIB = 4.0
# Memory model, in decoded frames (uint8 RGB at the evaluated size), measured with tracemalloc on the weight-free
# metrics: the decoder's own frames, a streamed frame's float working set, and a whole chunk's working set
# (float copies of every frame) for a scorer without a per-frame accumulator.
DECODER_FRAMES = 16
STREAM_WORK_FRAMES = 20
CHUNK_WORK_PER_FRAME = 9
HELD_WORK_PER_FRAME = 5  # a held frame plus its float32 tensor (reference backends)


class MemoryLimitError(ValueError):
    """Scoring a video would need more memory than the configured limit (checked before decoding)."""


@dataclass
class EvalConfig:
    metrics: list[str] = field(default_factory=lambda: list(METRIC_NAMES))
    num_chunks: int = DEFAULT_NUM_CHUNKS
    weighting: str = "linear"
    backend: str = "auto"
    weights_dir: str | None = None
    device: str = "cpu"
    max_side: int = 512
    max_memory_gib: float = DEFAULT_MAX_MEMORY_GIB

    def __post_init__(self):
        if self.num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1, got {self.num_chunks}")
        if not self.max_memory_gib > 0:
            raise ValueError(f"max_memory_gib must be > 0, got {self.max_memory_gib}")
        if self.weighting not in ("linear", "log"):
            raise ValueError(f"weighting must be 'linear' or 'log', got {self.weighting!r}")
        bad = [m for m in self.metrics if m not in METRIC_NAMES]
        if bad or not self.metrics:
            raise ValueError(f"metrics {bad or '[]'} invalid; choose from {list(METRIC_NAMES)}")


def evaluate_frames(frames: np.ndarray, scorers, cfg: EvalConfig) -> dict:
    return score_video(frames, scorers, cfg.num_chunks, cfg.weighting)


def estimate_memory(info: VideoInfo, scorers, num_chunks: int, whole_video: bool = False) -> tuple[int, str]:
    """Bytes scoring ``info``'s video is expected to hold at its peak, and what dominates them.

    Streamed scoring holds a few frames per metric whatever the length; a scorer without a per-frame
    accumulator holds its chunk; ``whole_video`` (a ground-truth hook) holds every frame.
    """
    fb = info.frame_bytes
    chunk = info.num_frames // num_chunks
    work, what = STREAM_WORK_FRAMES, "to score it frame by frame"
    for s in scorers.values():
        held = getattr(s, "held_frames", 0)
        w = CHUNK_WORK_PER_FRAME * chunk if held <= 0 else HELD_WORK_PER_FRAME * held
        if w > work:
            work = w
            what = (f"to hold a chunk of {chunk} frames for {s.backend}" if held <= 0
                    else f"to hold {held} frames at a time for {s.backend}")
    if whole_video:
        return fb * (DECODER_FRAMES + info.num_frames + work), "to hold the whole video for the ground-truth hook"
    return fb * (DECODER_FRAMES + work), what


def check_memory(info: VideoInfo, scorers, cfg: EvalConfig, whole_video: bool = False) -> int:
    """Raise MemoryLimitError, naming the numbers, when the estimate exceeds ``cfg.max_memory_gib``."""
    need, what = estimate_memory(info, scorers, cfg.num_chunks, whole_video)
    limit = int(cfg.max_memory_gib * 2**30)
    if need > limit:
        h, w = info.size
        raise MemoryLimitError(
            f"{info.path}: {info.num_frames} frames of {w}x{h} (--max-side {cfg.max_side}) need an estimated "
            f"{need / 2**30:.2f} GiB ({need} bytes) {what}, over the limit of {cfg.max_memory_gib:g} GiB; "
            f"raise it with --max-memory-gib or lower --max-side")
    return need


def score_file(path: str, scorers, cfg: EvalConfig, info: VideoInfo | None = None) -> tuple[dict, int]:
    """``score_stream`` of a video file decoded frame by frame. Returns (metrics, frames decoded).

    The chunk bounds come from the container's frame count; when decoding yields a count that moves them
    (a truncated file, frames the decoder drops), the file is decoded once more with the real count.
    """
    info = info or probe_video(path, cfg.max_side)
    n = info.num_frames
    for _ in range(2):
        try:
            return score_stream(iter_frames(path, cfg.max_side), n, scorers, cfg.num_chunks, cfg.weighting)
        except FrameCountError as e:
            n = e.actual
    raise VideoReadError(f"{path}: decoding gave different frame counts on two passes")


def evaluate_video(path: str, scorers, cfg: EvalConfig, ground_truth: GroundTruthHook | None = None,
                   frames: np.ndarray | None = None) -> dict:
    """One result record; never raises for a bad video: status 'failed' with the reason instead."""
    rec = {"path": path, "status": "failed", "reason": None, "num_frames": None, "fps": None,
           "chunk_frames": None, "metrics": {}, "ground_truth": None}
    t0 = time.perf_counter()
    try:
        if frames is None:
            info = probe_video(path, cfg.max_side)
            rec["fps"] = info.fps
            check_memory(info, scorers, cfg, whole_video=ground_truth is not None)
            if ground_truth is None:
                rec["metrics"], n = score_file(path, scorers, cfg, info)
            else:  # the hook takes the whole video; the metrics still stream (the same scores as without it)
                frames = read_video(path, cfg.max_side).frames
                rec["metrics"], n = score_stream(iter(frames), len(frames), scorers, cfg.num_chunks, cfg.weighting)
        else:
            n = len(frames)
            rec["metrics"] = evaluate_frames(frames, scorers, cfg)
        rec["num_frames"], rec["chunk_frames"] = int(n), int(n // cfg.num_chunks)
        if ground_truth is not None:
            rec["ground_truth"] = ground_truth(frames, {"path": path})
        rec["status"] = "ok"
    except (VideoReadError, TooShortError, MemoryLimitError) as e:
        rec["reason"] = str(e)
    except Exception as e:  # a metric failing on one video must not stop the others
        rec["reason"] = f"{type(e).__name__}: {e}"
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


# Process workers build their own scorers once (models do not pickle cheaply).
_WORKER: dict = {}


def _init_worker(cfg_dict: dict, hook_spec: str | None):
    import sys

    cfg = EvalConfig(**cfg_dict)
    _WORKER["cfg"] = cfg
    _WORKER["scorers"] = build_scorers(cfg.metrics, cfg.backend, cfg.weights_dir, cfg.device)
    if "torch" in sys.modules:  # reference models: the pool already uses the cores
        sys.modules["torch"].set_num_threads(1)
    if hook_spec:
        from .groundtruth import load_hook

        _WORKER["hook"] = load_hook(hook_spec)


def _worker_eval(path: str) -> dict:
    return evaluate_video(path, _WORKER["scorers"], _WORKER["cfg"], _WORKER.get("hook"))


def evaluate_videos(paths: Iterable[str], cfg: EvalConfig | None = None, workers: int = 1,
                    executor: str = "thread", ground_truth: GroundTruthHook | str | None = None,
                    progress: bool = True, scorers=None) -> list[dict]:
    """Evaluate videos; returns records in input order.

    ``executor='thread'`` shares one set of scorers between threads (numpy and torch release the GIL in
    their kernels); ``'process'`` gives each worker process its own scorers (spawned, one torch thread
    each), which suits the pure-numpy weight-free metrics on many cores. A process pool needs the
    ground-truth hook as a 'module:function' string.
    """
    cfg = cfg or EvalConfig()
    paths = list(paths)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if executor not in ("thread", "process"):
        raise ValueError(f"executor must be 'thread' or 'process', got {executor!r}")
    hook_spec = ground_truth if isinstance(ground_truth, str) else None
    if hook_spec:
        from .groundtruth import load_hook

        ground_truth = load_hook(hook_spec)
    results: list[dict | None] = [None] * len(paths)
    bar = tqdm(total=len(paths), desc="lvbench eval", unit="video", disable=not progress)
    if executor == "process" and workers > 1:
        if ground_truth is not None and not hook_spec:
            raise ValueError("a process pool needs the ground-truth hook as a 'module:function' string")
        import multiprocessing as mp

        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                   initargs=(asdict(cfg), hook_spec))
        with pool:
            futs = {pool.submit(_worker_eval, p): i for i, p in enumerate(paths)}
            for f in as_completed(futs):
                i = futs[f]
                try:
                    results[i] = f.result()
                except Exception as e:  # a worker that died (e.g. killed for memory) fails only its videos
                    results[i] = {"path": paths[i], "status": "failed", "metrics": {}, "ground_truth": None,
                                  "reason": f"worker process failed: {type(e).__name__}: {e}", "num_frames": None,
                                  "fps": None, "chunk_frames": None}
                bar.update(1)
    else:
        scorers = scorers or build_scorers(cfg.metrics, cfg.backend, cfg.weights_dir, cfg.device)
        with ThreadPoolExecutor(workers) as pool:
            futs = {pool.submit(evaluate_video, p, scorers, cfg, ground_truth): i for i, p in enumerate(paths)}
            for f in as_completed(futs):
                results[futs[f]] = f.result()
                bar.update(1)
    bar.close()
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ prompts
def _captions_of(rec: dict, where: str) -> list[str]:
    for key in ("captions", "prompts", "segments"):
        if key in rec:
            caps = rec[key]
            break
    else:
        if isinstance(rec.get("prompt"), str):
            return [rec["prompt"]]
        raise ValueError(f"{where}: no 'captions' (list), 'prompts' (list) or 'prompt' (string) field; "
                         f"keys are {sorted(rec)}")
    if not isinstance(caps, list) or not caps:
        raise ValueError(f"{where}: captions must be a non-empty list, got {type(caps).__name__}")
    out = []
    for j, c in enumerate(caps):
        if isinstance(c, dict):
            c = c.get("caption", c.get("text", c.get("prompt")))
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"{where}: caption {j} is not a non-empty string")
        out.append(c.strip())
    return out


def load_prompts(path: str) -> list[dict]:
    """Read a prompt manifest: one record per video with an id and its per-segment captions.

    Accepted layouts (LV-Bench's own manifest format is not published in a form we could confirm; these
    cover a JSON Lines or JSON export of {video_id, captions[...]}):
      * ``.jsonl``: one JSON object per line;
      * ``.json``: a list of such objects, or an object mapping video_id -> captions list (or -> record).
    Each record needs ``video_id`` (or ``id`` / ``name``; otherwise one is made from its index) and
    ``captions`` (list of strings, or of objects with ``caption``/``text``), ``prompts`` or one ``prompt``.
    An optional ``seed`` overrides the run's seed for that video.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    raw: list[tuple[str, object]] = []
    if path.endswith(".jsonl"):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    raw.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from e
        if isinstance(data, dict):
            for k, v in data.items():
                rec = dict(v) if isinstance(v, dict) else {"captions": v}
                rec.setdefault("video_id", k)
                raw.append((f"{path}[{k!r}]", rec))
        elif isinstance(data, list):
            raw = [(f"{path}[{i}]", r) for i, r in enumerate(data)]
        else:
            raise ValueError(f"{path}: expected a list or an object at the top level")
    items, seen = [], set()
    for i, (where, rec) in enumerate(raw):
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected an object, got {type(rec).__name__}")
        vid = str(rec.get("video_id", rec.get("id", rec.get("name", f"prompt_{i:04d}"))))
        if vid in seen:
            raise ValueError(f"{where}: duplicate video_id {vid!r}")
        seen.add(vid)
        item = {"video_id": vid, "captions": _captions_of(rec, where)}
        if "seed" in rec:
            item["seed"] = int(rec["seed"])
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no prompts")
    return items


def prompt_schedule(captions: list[str], num_frames: int) -> list[tuple[int, str]]:
    """Switch captions at evenly spaced pixel frames: caption j starts at floor(j * N / K).

    LV-Bench captions describe consecutive 2-3 s segments of the source video; spreading them evenly over
    the generated length keeps their order and relative spans.
    """
    k = len(captions)
    if num_frames < k:
        raise ValueError(f"{num_frames} frames cannot hold {k} caption segments")
    return [((j * num_frames) // k, c) for j, c in enumerate(captions)]


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("._") or "video"


def generate_videos(engine, items: list[dict], num_frames: int, video_dir: str, seed: int = 0,
                    keep_frames: bool = False, progress: bool = True):
    """Generate one mp4 per prompt item with the engine (prompts switching per segment).

    Yields (item, path, frames_or_None, error_or_None) per item; a failing item does not stop the others.
    """
    os.makedirs(video_dir, exist_ok=True)
    for item in tqdm(items, desc="lvbench generate", unit="video", disable=not progress):
        path = os.path.join(video_dir, _safe_name(item["video_id"]) + ".mp4")
        tmp = path + ".part.mp4"
        kept = [] if keep_frames else None
        try:
            sched = prompt_schedule(item["captions"], num_frames)
            n = 0
            with Mp4Writer(tmp, int(engine.fps)) as w:
                for block in engine.generate(item["captions"][0], num_frames=num_frames,
                                             seed=item.get("seed", seed), prompt_schedule=sched):
                    block = np.asarray(block)
                    w.write(block)
                    n += len(block)
                    if kept is not None:
                        kept.append(block)
            if n == 0:
                raise RuntimeError("the engine produced no frames")
            os.replace(tmp, path)
            item["frames_generated"] = n
            yield item, path, (np.concatenate(kept) if kept else None), None
        except Exception as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            yield item, path, None, f"generation failed: {type(e).__name__}: {e}"


def run_benchmark(model: str, prompts: str, num_frames: int, out_dir: str, cfg: EvalConfig | None = None,
                  seed: int = 0, device: str = "cpu", engine=None,
                  engine_factory: Callable[[str, str], object] | None = None,
                  ground_truth: GroundTruthHook | None = None, progress: bool = True) -> list[dict]:
    """Generate every prompt with the engine, then evaluate the videos. Returns result records.

    ``engine`` (an object with ``generate`` and ``fps``) or ``engine_factory(model, device)`` replace the
    default ``inferix.Engine.from_pretrained(model, device=device)``.
    """
    cfg = cfg or EvalConfig()
    items = load_prompts(prompts)
    if num_frames < 1:
        raise ValueError(f"--frames must be >= 1, got {num_frames}")
    if engine is None:
        if engine_factory is None:
            from inferix import Engine  # the engine floor; lvbench sits above it

            engine_factory = lambda m, d: Engine.from_pretrained(m, device=d)  # noqa: E731
        engine = engine_factory(model, device)
    scorers = build_scorers(cfg.metrics, cfg.backend, cfg.weights_dir, cfg.device)
    records = []
    for item, path, frames, err in generate_videos(engine, items, num_frames, os.path.join(out_dir, "videos"),
                                                   seed, keep_frames=ground_truth is not None,
                                                   progress=progress):
        if err is not None:
            rec = {"path": path, "status": "failed", "reason": err, "num_frames": None, "fps": None,
                   "chunk_frames": None, "metrics": {}, "ground_truth": None}
        else:
            rec = evaluate_video(path, scorers, cfg)
            if ground_truth is not None and rec["status"] == "ok":
                try:
                    rec["ground_truth"] = ground_truth(frames, dict(item))
                except Exception as e:
                    rec["ground_truth"] = {"error": f"{type(e).__name__}: {e}"}
        rec["video_id"] = item["video_id"]
        rec["captions"] = item["captions"]
        rec["prompt_schedule"] = [[s, c] for s, c in prompt_schedule(item["captions"], num_frames)] \
            if len(item["captions"]) <= num_frames else None
        rec["frames_requested"] = num_frames
        records.append(rec)
    return records


def summarize(records: list[dict], metrics: list[str]) -> dict:
    """Per metric: backends used, videos scored, mean and median VDE (infinite VDEs counted apart)."""
    out = {}
    for m in metrics:
        vals = [r["metrics"][m]["vde"] for r in records if r["status"] == "ok" and m in r["metrics"]]
        finite = [v for v in vals if math.isfinite(v)]
        backends = sorted({r["metrics"][m]["backend"] for r in records if r["status"] == "ok" and m in r["metrics"]})
        out[m] = {"backends": backends, "videos": len(vals), "infinite": len(vals) - len(finite),
                  "mean_vde": float(np.mean(finite)) if finite else None,
                  "median_vde": float(np.median(finite)) if finite else None}
    return out
