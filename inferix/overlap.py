"""Decode overlapped with the next passes: one worker thread (and a side CUDA stream on GPUs)."""
from __future__ import annotations

import time

import torch

__all__ = ["DecodeWorker"]


class DecodeWorker:
    """Decodes finished blocks on one worker thread, in the order they were handed over, while the caller runs
    the next passes (on CUDA on a side stream that waits for the block's latents). ``submit`` returns a Future
    of the frames; one thread keeps each stream's decoder state updates in order."""

    def __init__(self, device: torch.device):
        from concurrent.futures import ThreadPoolExecutor
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inferix-decode")
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.seconds = 0.0  # decode time on the worker

    def submit(self, decode, state, latents: torch.Tensor):
        ready = None
        if self.stream is not None:  # the latents are made on the current stream: the side stream waits for them
            ready = torch.cuda.Event()
            ready.record()
            latents.record_stream(self.stream)
        return self.pool.submit(self._run, decode, state, latents, ready)

    def _run(self, decode, state, latents, ready):
        tic = time.perf_counter()
        try:
            if self.stream is None:
                return decode(state, latents)
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(ready)
                return decode(state, latents)
        finally:
            self.seconds += time.perf_counter() - tic

    def close(self) -> None:
        self.pool.shutdown(wait=True)
