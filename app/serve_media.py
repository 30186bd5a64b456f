"""Video for network clients: an H.264 fragmented-MP4 stream (MediaSource plays it) or one JPEG per frame.

``FMP4Encoder`` writes with PyAV into memory and hands out whole top-level MP4 boxes: first the init segment
(``ftyp`` + ``moov``), then one ``moof`` + ``mdat`` fragment per frame (``frag_every_frame``, x264 with
``zerolatency``: no B-frames, no look-ahead), so every frame can leave as soon as it is encoded.
"""
from __future__ import annotations

import io
import re
import struct

import numpy as np

__all__ = ["FMP4Encoder", "jpeg_frames", "codec_string", "split_boxes"]


class _Sink(io.RawIOBase):
    """A write-only, non-seekable byte sink (PyAV writes the MP4 here)."""

    def __init__(self):
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.data += b
        return len(b)


def split_boxes(data: bytearray) -> list[tuple[bytes, bytes]]:
    """Remove the complete top-level boxes at the front of ``data``; returns ``(type, box bytes)`` pairs."""
    out = []
    pos = 0
    while len(data) - pos >= 8:
        size, kind = struct.unpack(">I4s", bytes(data[pos:pos + 8]))
        if size == 1:  # 64-bit size
            if len(data) - pos < 16:
                break
            size = struct.unpack(">Q", bytes(data[pos + 8:pos + 16]))[0]
        if size < 8:
            raise ValueError(f"corrupt MP4 box {kind!r} of size {size}")
        if len(data) - pos < size:
            break
        out.append((kind, bytes(data[pos:pos + size])))
        pos += size
    del data[:pos]
    return out


def codec_string(init: bytes) -> str:
    """The RFC 6381 codec string (``avc1.PPCCLL``) of an init segment, from its ``avcC`` box."""
    i = init.find(b"avcC")
    if i < 0 or len(init) < i + 8:
        raise ValueError("the init segment holds no avcC box")
    profile, compat, level = init[i + 5], init[i + 6], init[i + 7]
    return f"avc1.{profile:02X}{compat:02X}{level:02X}"


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _full_box(kind: bytes, version: int, flags: int, payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags) + payload)


def annexb_to_avcc(data: bytes) -> bytes:
    """H.264 Annex B (start codes) to length-prefixed NAL units; parameter sets and delimiters (in the init
    segment's avcC already) are left out."""
    out = bytearray()
    for nal in re.split(rb"\x00\x00\x01", data):
        nal = nal.rstrip(b"\x00") if nal.endswith(b"\x00") else nal  # a 4-byte start code's leading zero
        if not nal or (nal[0] & 0x1F) in (7, 8, 9):
            continue
        out += struct.pack(">I", len(nal)) + nal
    return bytes(out)


class FMP4Encoder:
    """Encode uint8 [T, H, W, 3] frame blocks to fMP4 pieces; one encoder per client connection.

    PyAV's MP4 muxer writes the init segment; the fragments are written here, one per frame, as soon as the
    frame is encoded (the muxer would hold each fragment back until the next frame arrives)."""

    def __init__(self, width: int, height: int, fps: int, crf: int = 23):
        import av
        if width % 2 or height % 2:
            raise ValueError(f"H.264 needs an even frame size, got {width}x{height}")
        self.width, self.height, self.fps = width, height, fps
        self._sink = _Sink()
        self._out = av.open(self._sink, mode="w", format="mp4", options={"movflags": "empty_moov+default_base_moof"})
        st = self._out.add_stream("libx264", rate=fps, options={
            "preset": "ultrafast", "tune": "zerolatency", "crf": str(crf), "profile": "baseline",
            "g": str(max(1, 2 * fps))})
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        self._stream = st
        self._n = 0  # frames encoded
        self._seq = 0  # fragments written
        self._tick = 0  # sample duration in the track's timescale
        self.init: bytes | None = None  # the init segment (ftyp + moov), once the first frame is encoded
        self.codec: str | None = None
        self._closed = False

    @property
    def mime(self) -> str | None:
        return None if self.codec is None else f'video/mp4; codecs="{self.codec}"'

    def encode(self, frames: np.ndarray) -> list[bytes]:
        """The MP4 pieces for these frames: the init segment first (once), then one fragment per frame."""
        import av
        f = np.asarray(frames)
        if f.ndim != 4 or f.shape[1:] != (self.height, self.width, 3) or f.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [T, {self.height}, {self.width}, 3], got {f.dtype} {f.shape}")
        if self._closed:
            raise RuntimeError("the encoder is closed")
        out = []
        for img in f:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            vf.pts = self._n
            self._n += 1
            for pkt in self._stream.encode(vf):
                out += self._packet(pkt)
        return out

    def _packet(self, pkt) -> list[bytes]:
        out = []
        if self.init is None:  # the muxer writes ftyp + moov when it gets the first packet
            self._out.mux(pkt)
            boxes = split_boxes(self._sink.data)
            self.init = b"".join(b for kind, b in boxes if kind in (b"ftyp", b"moov"))
            self.codec = codec_string(self.init)
            self._tick = max(1, round(self._stream.time_base.denominator / (self._stream.time_base.numerator * self.fps)))
            out.append(self.init)
        out.append(self._fragment(annexb_to_avcc(bytes(pkt)), pkt.is_keyframe))
        return out

    def _fragment(self, sample: bytes, key: bool) -> bytes:
        self._seq += 1
        flags = 0x02000000 if key else 0x01010000  # depends on no sample / a non-sync sample
        base = (self._seq - 1) * self._tick

        def moof(offset: int) -> bytes:
            trun = _full_box(b"trun", 0, 0x000701, struct.pack(">IiIII", 1, offset, self._tick, len(sample), flags))
            traf = _box(b"traf", _full_box(b"tfhd", 0, 0x020000, struct.pack(">I", 1)) +
                        _full_box(b"tfdt", 1, 0, struct.pack(">Q", base)) + trun)
            return _box(b"moof", _full_box(b"mfhd", 0, 0, struct.pack(">I", self._seq)) + traf)
        size = len(moof(0))
        return moof(size + 8) + _box(b"mdat", sample)

    def close(self) -> list[bytes]:
        """Flush the encoder; returns the fragments of frames it still held (none with zerolatency)."""
        if self._closed:
            return []
        self._closed = True
        out = []
        try:
            for pkt in self._stream.encode(None):
                out += self._packet(pkt)
        finally:
            try:
                self._out.close()
            except Exception:  # noqa: BLE001 - the muxer's own trailer is never sent; nothing to keep
                pass
        return out


def jpeg_frames(frames: np.ndarray, quality: int = 85) -> list[bytes]:
    """One JPEG per frame of a uint8 [T, H, W, 3] block."""
    from PIL import Image
    out = []
    for img in np.asarray(frames):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out
