"""Video sinks: one PyAV encoder open for the whole stream, mp4 files written atomically, RTMP/FLV streams.

A file is written to ``<name>.partial`` and renamed when the stream closes cleanly; on failure or interruption
the partial file is removed, so a broken mp4 is never left behind.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

__all__ = ["VideoWriter", "Mp4Writer", "check_output_file"]


def check_output_file(target: str | os.PathLike, what: str = "output") -> Path:
    """An output file path that can be written: not a folder, in a folder that exists. Checked before any work,
    so a bad path fails at once instead of after a whole video was made."""
    path = Path(target)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(target)!r} is a folder; name a file in it, e.g. {path / 'video.mp4'}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"{what} folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{what} folder is not writable: {parent}")
    return path


class VideoWriter:
    def __init__(self, target: str | os.PathLike, fps: int = 16, *, codec: str = "libx264", crf: int = 23,
                 preset: str = "veryfast", container_format: str | None = None):
        self.target = str(target)
        self.fps = int(fps)
        if self.fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.is_stream = "://" in self.target
        if self.is_stream:
            self.path = None
            self.tmp = None
            fmt = container_format or ("flv" if self.target.startswith("rtmp") else None)
            self.container = av.open(self.target, mode="w", format=fmt)
        else:
            self.path = check_output_file(self.target)
            self.tmp = self.path.with_name(self.path.name + ".partial")
            fmt = container_format or {".mp4": "mp4", ".mkv": "matroska", ".webm": "webm", ".flv": "flv",
                                       ".ts": "mpegts"}.get(self.path.suffix.lower(), "mp4")
            self.container = av.open(str(self.tmp), mode="w", format=fmt)
        self.codec, self.crf, self.preset = codec, crf, preset
        self.stream = None
        self.frames = 0
        self.closed = False

    def _open_stream(self, h: int, w: int) -> None:
        if h % 2 or w % 2:
            raise ValueError(f"frame size {w}x{h} must be even for yuv420p video")
        self.stream = self.container.add_stream(self.codec, rate=Fraction(self.fps, 1))
        self.stream.width, self.stream.height = w, h
        self.stream.pix_fmt = "yuv420p"
        if self.codec in ("libx264", "h264"):
            self.stream.options = {"crf": str(self.crf), "preset": self.preset}

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 frames [T, H, W, 3] (or one [H, W, 3])."""
        if self.closed:
            raise RuntimeError("the video writer is closed")
        f = np.asarray(frames)
        if f.ndim == 3:
            f = f[None]
        if f.ndim != 4 or f.shape[-1] != 3 or f.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got {f.dtype} {f.shape}")
        if self.stream is None:
            self._open_stream(f.shape[1], f.shape[2])
        elif (f.shape[1], f.shape[2]) != (self.stream.height, self.stream.width):
            raise ValueError(f"frame size changed from {self.stream.width}x{self.stream.height} to {f.shape[2]}x{f.shape[1]}")
        for img in f:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            for pkt in self.stream.encode(frame):
                self.container.mux(pkt)
            self.frames += 1

    def close(self) -> Path | str:
        """Flush the encoder once (end of stream) and finalize the file."""
        if self.closed:
            return self.path or self.target
        self.closed = True
        try:
            if self.stream is not None:
                for pkt in self.stream.encode(None):
                    self.container.mux(pkt)
            self.container.close()
        except BaseException:
            self._remove_tmp()
            raise
        if self.tmp is not None:
            if self.frames == 0:
                self._remove_tmp()
                raise RuntimeError(f"no frames were written; {self.path} was not created")
            try:
                os.replace(self.tmp, self.path)
            except OSError:
                self._remove_tmp()
                raise
        return self.path or self.target

    def abort(self) -> None:
        """Drop the output: the partial file is removed."""
        if self.closed:
            return
        self.closed = True
        try:
            self.container.close()
        except Exception:
            pass
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        if self.tmp is not None and self.tmp.exists():
            self.tmp.unlink()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


Mp4Writer = VideoWriter
