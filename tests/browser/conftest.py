"""Browser tests of the streaming demo: the Gradio server runs in this process (its own threads, a free
127.0.0.1 port), headless Debian Chromium is driven by PyPI playwright (never `playwright install`).

The model is the embedded default (the toy world when its weights are installed, else the tiny preset at 32x32),
on the CPU with one torch thread. Every wait is bounded; the server and the browser are always shut down.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from browser_utils import running_demo, wait_until

ARTIFACTS = Path(__file__).parent / "artifacts"


@pytest.fixture(scope="session")
def demo():
    import torch
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    torch.set_num_threads(1)
    from inferix import default_model
    from inferix.app.hub import DemoConfig, Hub

    model = default_model()
    size = dict(height=32, width=32) if model == "tiny" else {}
    # two live streams fill the KV pool; rewind points every 2 blocks, two per tab at most
    cfg = DemoConfig(model=model, device="cpu", max_sessions=2, max_frames=20000, snapshots=2, snapshot_every=2,
                     threads=1, **size)
    t0 = time.monotonic()
    hub = Hub(cfg)
    with running_demo(hub) as url:
        print(f"demo server ({model}) up in {time.monotonic() - t0:.1f} s")
        yield SimpleNamespace(hub=hub, url=url, model=model)


@pytest.fixture
def context(browser, demo):
    """A fresh browser context per test; closing it closes its tabs, which must free their sessions."""
    wait_until(lambda: not demo.hub.tabs, 15, "tabs of earlier tests to be closed")
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(15000)
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS
