"""Video reading and writing with PyAV."""
from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Iterator

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v")


class VideoReadError(RuntimeError):
    """A video that cannot be decoded (missing, corrupt, no video stream, no frames)."""


@dataclass
class Video:
    path: str
    frames: np.ndarray  # uint8 [T, H, W, 3], possibly downscaled (see read_video)
    fps: float
    native_size: tuple[int, int]  # (H, W) as stored in the file


def _fit_long_side(h: int, w: int, max_side: int) -> tuple[int, int]:
    if max_side <= 0 or max(h, w) <= max_side:
        return h, w
    s = max_side / max(h, w)
    # even sizes keep later mp4 re-encoding (yuv420p) possible
    return max(2, int(round(h * s / 2)) * 2), max(2, int(round(w * s / 2)) * 2)


@dataclass
class VideoInfo:
    """What the container says about a video, before any decoding."""

    path: str
    num_frames: int  # the stream's frame count, or its packets counted when the container does not say
    fps: float
    native_size: tuple[int, int]  # (H, W) as stored in the file
    size: tuple[int, int]  # (H, W) after the max_side downscale

    @property
    def frame_bytes(self) -> int:
        """Bytes of one decoded uint8 RGB frame at ``size``."""
        return self.size[0] * self.size[1] * 3


def _open_stream(path: str, container):
    if not container.streams.video:
        raise VideoReadError(f"{path}: no video stream")
    return container.streams.video[0]


def probe_video(path: str, max_side: int = 512) -> VideoInfo:
    """Frame count, rate and sizes from the container's stream metadata; demuxes (never decodes) to count the
    packets when the container does not record the frame count (e.g. mkv, webm)."""
    import av  # local import: the drift core must not need PyAV

    if not os.path.isfile(path):
        raise VideoReadError(f"{path}: no such file")
    try:
        with av.open(path) as container:
            stream = _open_stream(path, container)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            h, w = stream.codec_context.height, stream.codec_context.width
            n = int(stream.frames or 0)
            if n <= 0:
                n = sum(1 for p in container.demux(stream) if p.size)
            if n <= 0:
                raise VideoReadError(f"{path}: no decodable frames")
    except VideoReadError:
        raise
    except Exception as e:  # PyAV raises many error types (InvalidDataError, ValueError, ...)
        raise VideoReadError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
    if h <= 0 or w <= 0:
        raise VideoReadError(f"{path}: the video stream has no frame size ({w}x{h})")
    return VideoInfo(path=path, num_frames=n, fps=float(rate) if rate else 0.0, native_size=(h, w),
                     size=_fit_long_side(h, w, max_side))


def iter_frames(path: str, max_side: int = 512) -> Iterator[np.ndarray]:
    """Decode ``path`` frame by frame: RGB uint8 [H, W, 3], downscaled as in ``read_video``.

    Only the decoder's own few frames are in memory at a time. Raises VideoReadError (also part way through,
    for a file that breaks off) and when the video has no decodable frame.
    """
    import av

    if not os.path.isfile(path):
        raise VideoReadError(f"{path}: no such file")
    n = 0
    try:
        with av.open(path) as container:
            stream = _open_stream(path, container)
            th, tw = _fit_long_side(stream.codec_context.height, stream.codec_context.width, max_side)
            for frame in container.decode(stream):
                if (frame.height, frame.width) != (th, tw):
                    img = frame.reformat(width=tw, height=th, format="rgb24", interpolation="AREA").to_ndarray()
                else:
                    img = frame.to_ndarray(format="rgb24")
                n += 1
                yield np.ascontiguousarray(img)
    except VideoReadError:
        raise
    except Exception as e:  # PyAV raises many error types (InvalidDataError, ValueError, ...)
        raise VideoReadError(f"{path}: cannot decode video ({type(e).__name__}: {e})") from e
    if not n:
        raise VideoReadError(f"{path}: no decodable frames")


def read_video(path: str, max_side: int = 512) -> Video:
    """Decode every frame of ``path`` to RGB uint8 [T, H, W, 3].

    Frames whose long side exceeds ``max_side`` are resized (PyAV's scaler, area filter) to a long side of
    ``max_side``: the protocol's clarity metric does the same at 512, and it bounds memory for minute-long
    videos. ``max_side=0`` keeps the native size. This holds the whole video; ``iter_frames`` streams it.
    """
    info = probe_video(path, max_side)
    frames = np.empty((info.num_frames, *info.size, 3), dtype=np.uint8)
    extra = []
    n = 0
    for img in iter_frames(path, max_side):
        if n < len(frames):
            frames[n] = img
        else:  # more frames than the container announced
            extra.append(img.copy())
        n += 1
    frames = np.concatenate([frames, np.stack(extra)]) if extra else frames[:n]
    return Video(path=path, frames=frames, fps=info.fps, native_size=info.native_size)


class Mp4Writer:
    """Streams uint8 [T, H, W, 3] blocks into an H.264 (libx264, yuv420p) mp4."""

    def __init__(self, path: str, fps: int, crf: int = 18):
        self.path = path
        self.fps = int(fps)
        self.crf = crf
        self._container = None
        self._stream = None

    def _open(self, h: int, w: int):
        import av

        if h % 2 or w % 2:
            raise ValueError(f"yuv420p needs even frame sizes, got {h}x{w}")
        self._container = av.open(self.path, mode="w")
        self._stream = self._container.add_stream("libx264", rate=Fraction(self.fps, 1))
        self._stream.width, self._stream.height = w, h
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = {"crf": str(self.crf)}

    def write(self, block: np.ndarray) -> None:
        import av

        if block.ndim != 4 or block.shape[-1] != 3 or block.dtype != np.uint8:
            raise ValueError(f"block must be uint8 [T, H, W, 3], got {block.dtype} {tuple(block.shape)}")
        if self._container is None:
            self._open(block.shape[1], block.shape[2])
        for img in block:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            for packet in self._stream.encode(frame):
                self._container.mux(packet)

    def close(self) -> None:
        if self._container is None:
            return
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_video(path: str, frames: np.ndarray | Iterable[np.ndarray], fps: int = 16, crf: int = 18) -> None:
    """Write frames (one [T, H, W, 3] array or an iterable of blocks) to an mp4."""
    with Mp4Writer(path, fps, crf) as w:
        if isinstance(frames, np.ndarray):
            w.write(frames)
        else:
            for block in frames:
                w.write(block)


def find_videos(inputs: Iterable[str]) -> list[str]:
    """Expand files and directories (non-recursive, sorted) into a list of video paths.

    A named file is kept whatever its extension (so a broken file is reported, not silently skipped);
    directories contribute files with a known video extension.
    """
    out: list[str] = []
    for p in inputs:
        if os.path.isdir(p):
            out.extend(sorted(os.path.join(p, f) for f in os.listdir(p)
                              if f.lower().endswith(VIDEO_EXTENSIONS) and os.path.isfile(os.path.join(p, f))))
        else:
            out.append(p)
    return out
