"""The streaming demo in headless Chromium: start, steer, rewind, stop, download, several tabs, a full pool.

What is compared server-side (the server runs in this process) is each tab's recording, the frames the page
plays: same seed and prompt give the same frames in any tab (up to the +-1 grey level that batching sessions
together may cause), so a tab's stream can be checked against another tab's.
"""
from __future__ import annotations

import io
import time

import numpy as np
import pytest

from browser_utils import wait_until

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,  # a real Chromium per test
    # gradio's queue calls pandas options that pandas 3 deprecates; nothing of the demo's
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting.*"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated.*"),
]

BATCH_NOISE = 2  # grey levels: the same stream computed alone or batched with others may differ by 1


# ---- page helpers -------------------------------------------------------------------------------------------
def open_page(context, demo):
    page = context.new_page()
    page.goto(demo.url, timeout=30000)
    page.wait_for_selector("#start")
    wait_until(lambda: page.evaluate("!!window.__inferixKeys"), 10, "the key handler script")
    return page


def stat(page, key: str) -> str:
    loc = page.locator(f'#stats [data-stat="{key}"]')
    return loc.inner_text() if loc.count() else ""


def frames_shown(page) -> int:
    txt = stat(page, "frames")
    return int(txt.split("/")[0]) if txt else 0


def tab_of(demo, page):
    """The server-side tab behind a page, found through the stream id the page shows."""
    (sid,) = wait_until(lambda: stat(page, "session").lstrip("#").isdigit() and (int(stat(page, "session")[1:]),),
                        10, "the page to show its stream id")
    for tab in list(demo.hub.tabs.values()):
        if tab.session is not None and tab.session.id == sid:
            return tab
    raise AssertionError(f"no tab holds stream #{sid}")


def stream_pixels(page) -> np.ndarray:
    from PIL import Image
    png = page.locator("#stream img").screenshot(timeout=5000)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def image_src(page):
    return page.evaluate("(() => { const i = document.querySelector('#stream img'); return i ? i.src : null })()")


def distinct_images(page, seconds: float) -> tuple[int, int]:
    """(distinct img srcs, distinct rendered pixel contents) seen while polling the live image."""
    page.bring_to_front()  # a background page renders lazily: its first screenshot alone can take seconds
    srcs, pix = set(), set()
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end or n < 5:
        n += 1
        s = image_src(page)
        if s:
            srcs.add(s)
            pix.add(stream_pixels(page).tobytes())
        time.sleep(0.15)
    return len(srcs), len(pix)


def focus_page_body(page):
    page.locator("h3").first.click()  # away from inputs and buttons, so keys go to the document


def diff(a, b) -> np.ndarray:
    return np.abs(np.stack(a).astype(np.int16) - np.stack(b).astype(np.int16))


# ---- tests --------------------------------------------------------------------------------------------------
def test_single_tab_stream_keys_rewind_stop_download(context, demo, artifacts):
    hub = demo.hub
    page = open_page(context, demo)
    assert page.title() == "Inferix live demo"
    for sel in ("#prompt", "#start", "#pause", "#stop", "#stream", "#stats", "#rewind", "#save", "#act-left"):
        assert page.locator(sel).count() == 1, sel
    assert page.locator("#pause").inner_text().strip() == "Pause"
    assert image_src(page) is None  # nothing streamed before Start
    baseline_pages = hub.engine.pages_in_use

    # Start: frames arrive and the picture changes while we watch
    page.click("#start")
    wait_until(lambda: frames_shown(page) > 0, 20, "the first frames")
    wait_until(lambda: stat(page, "status") == "running", 5, "status running")
    n_src, n_pix = distinct_images(page, 2.5)
    assert n_src >= 5 and n_pix >= 3, (n_src, n_pix)
    tab = tab_of(demo, page)
    assert hub.engine.pages_in_use > baseline_pages
    fps = stat(page, "fps")
    assert fps and fps[0].isdigit(), f"no pixel FPS shown: {fps!r}"
    assert stat(page, "latency").endswith(" s") and stat(page, "kv").count("/") == 1
    page.screenshot(path=str(artifacts / "demo_running.png"))

    # keys steer: they reach the tab's session (shown in the status line and held by the tab)
    focus_page_body(page)
    n_before_keys = tab.total_frames
    page.keyboard.press("ArrowLeft")
    wait_until(lambda: stat(page, "action").startswith("left"), 5, "action 'left' after ArrowLeft")
    page.keyboard.press("d")
    wait_until(lambda: stat(page, "action").startswith("right"), 5, "action 'right' after the D key")
    assert tab.action == "right"
    if hub.model_actions:
        # a world model: the held action reaches the engine and the frames after it differ from a stream that
        # got no key (same seed and prompt, opened server-side as a reference tab)
        n_key = tab.total_frames  # 'right' is held from the block after this at the latest
        ref = hub.start("reference-no-keys", tab.prompt, 0)
        need = n_key + 4 * hub.block_pixels
        wait_until(lambda: ref.total_frames >= need and tab.total_frames >= need, 30, "frames after the key press")
        a, b = tab.recorded()[:need], ref.recorded()[:need]
        assert diff(a[:n_before_keys], b[:n_before_keys]).max() <= BATCH_NOISE
        assert diff(a[n_key + 2 * hub.block_pixels:], b[n_key + 2 * hub.block_pixels:]).mean() > 1.0
        hub.close_tab("reference-no-keys")
    else:
        assert "takes no actions" in stat(page, "action")  # said honestly on the page
    page.locator("#prompt textarea, #prompt input").first.click()
    page.keyboard.press("w")  # typing in the prompt must not steer
    time.sleep(0.3)
    assert stat(page, "action").startswith("right")
    page.keyboard.press("Backspace")

    # rewind & branch: pause where the newest rewind point lies at least one block back, so the old branch
    # has frames after it to compare with. A click lands a steady delay after it is sent, so each retry waits a
    # random part of a whole rewind-point cycle first; otherwise every try may land on the same block of the cycle.
    for _ in range(20):
        page.click("#pause")
        wait_until(lambda: page.locator("#pause").inner_text().strip() == "Resume", 5, "the Resume label")
        wait_until(lambda: tab.session.status == "paused", 5, "the session to pause")
        time.sleep(0.2)
        if tab.snapshots and tab.total_frames - tab.snapshots[-1].frames >= hub.block_pixels:
            break
        page.click("#pause")  # resume and try again at a random point of the rewind-point cycle
        wait_until(lambda: tab.session.status == "running", 5, "the session to resume")
        b0, t0 = tab.blocks, time.monotonic()
        wait_until(lambda: tab.blocks >= b0 + 2, 10, "two blocks after resuming")
        block_s = (time.monotonic() - t0) / 2
        time.sleep(block_s * hub.config.snapshot_every * np.random.rand())
    else:
        pytest.fail(f"no rewind point with frames after it came up: {len(tab.snapshots)} rewind points, "
                    f"newest at {tab.snapshots[-1].frames if tab.snapshots else None}, frames {tab.total_frames}")
    paused_at = tab.total_frames
    time.sleep(0.6)
    assert tab.total_frames == paused_at and stat(page, "status") == "paused"
    snap = tab.snapshots[-1]
    old = tab.recorded()
    options = page.locator("#snapshots label")
    wait_until(lambda: options.count() == len(tab.snapshots), 5, "the rewind points listed on the page")
    options.nth(options.count() - 1).click()
    page.click("#rewind")
    wait_until(lambda: tab.session.id == snap.session.id, 10, "the tab to continue from the rewind point")
    assert tab.epoch_start == snap.frames
    wait_until(lambda: stat(page, "status") == "running" and page.locator("#pause").inner_text().strip() == "Pause",
               10, "the branch to run")
    redo = wait_until(lambda: len(tab.recorded()) >= len(old) and tab.recorded(), 20, "the branch to catch up")
    # the fork resumed exactly where the stream was: without changes it replays the same frames
    assert diff(redo[snap.frames:len(old)], old[snap.frames:]).max() <= BATCH_NOISE
    assert len(old) - snap.frames >= hub.block_pixels

    # Stop: the stream ends, frees its pages, and the picture freezes
    page.click("#stop")
    wait_until(lambda: stat(page, "status") == "stopped", 10, "status stopped")
    wait_until(lambda: hub.engine.pages_in_use == baseline_pages, 5, "the tab's KV pages to be freed")
    assert tab.snapshots == [] and tab.session.status == "cancelled"
    time.sleep(0.3)  # a frame already on its way to the page may still land
    n_stop = frames_shown(page)
    src = image_src(page)
    time.sleep(1.0)
    assert frames_shown(page) == n_stop == tab.total_frames and image_src(page) == src

    # download: the mp4 holds the recording, frame by frame
    page.click("#save")
    link = page.locator("#video-file a[href]").first
    link.wait_for(timeout=15000)
    href = link.get_attribute("href")
    # the download names no session: its name cannot be used to reach this tab
    assert tab.key not in href and tab.key not in page.inner_text("#video-file"), href
    resp = page.request.get(href, timeout=15000)
    assert resp.ok
    mp4 = artifacts / "demo_download.mp4"
    mp4.write_bytes(resp.body())
    import av
    with av.open(str(mp4)) as c:
        got = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    rec = tab.recorded()
    assert len(got) == len(rec) == n_stop
    assert got[0].shape == (hub.engine.height, hub.engine.width, 3)
    # the video is this recording, in order: where the recording changes between frame i and frame i + k (k = 1..3),
    # the decoded frame i is nearer to recorded frame i than to i + k, and decoded i + k nearer to i + k than to i
    # (h264 with 4:2:0 chroma blurs these tiny frames too much for a tight per-pixel bound everywhere)
    def err(a, b):
        return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
    n = len(got)
    for k in (1, 2, 3):
        own = other = 0.0
        for i in range(n - k):
            moved = np.abs(rec[i].astype(np.int16) - rec[i + k].astype(np.int16)).sum(-1) > 60
            for g, mine, theirs in ((got[i], rec[i], rec[i + k]), (got[i + k], rec[i + k], rec[i])):
                own += np.abs(g[moved].astype(np.int16) - mine[moved].astype(np.int16)).sum()
                other += np.abs(g[moved].astype(np.int16) - theirs[moved].astype(np.int16)).sum()
        assert other > 0 and own < 0.5 * other, (k, own, other)
    assert np.mean([err(g, r) for g, r in zip(got, rec)]) < 8.0


def test_two_tabs_stream_independently_and_prompt_change(context, demo):
    hub = demo.hub
    a, b = open_page(context, demo), open_page(context, demo)
    for p in (a, b):
        p.fill("#prompt textarea, #prompt input", "a dog runs in the snow")
        p.click("#start")
    for p in (a, b):
        wait_until(lambda: frames_shown(p) > 0, 20, "frames in both tabs")
    ta, tb = tab_of(demo, a), tab_of(demo, b)
    assert ta is not tb and ta.session.id != tb.session.id
    for p in (a, b):
        n_src, _ = distinct_images(p, 1.2)
        assert n_src >= 3, (n_src, p.inner_text("#stats"))

    # pausing one tab leaves the other running
    a.click("#pause")
    wait_until(lambda: ta.session.status == "paused", 5, "tab A to pause")
    na, nb = ta.total_frames, tb.total_frames
    time.sleep(1.2)
    assert ta.total_frames == na and tb.total_frames > nb + hub.block_pixels
    assert stat(a, "status") == "paused" and stat(b, "status") == "running"
    a.click("#pause")
    wait_until(lambda: ta.session.status == "running", 5, "tab A to resume")

    # B switches its prompt with Enter; A keeps its own
    b.fill("#prompt textarea, #prompt input", "a blue river under a green tree at night")
    n_switch = tb.total_frames
    b.locator("#prompt textarea, #prompt input").first.press("Enter")
    wait_until(lambda: stat(b, "prompt") == "a blue river under a green tree at night", 5, "B's new prompt")
    assert tb.session.prompt == "a blue river under a green tree at night"
    assert ta.session.prompt == "a dog runs in the snow" and stat(a, "prompt") == "a dog runs in the snow"
    need = n_switch + 4 * hub.block_pixels
    wait_until(lambda: ta.total_frames >= need and tb.total_frames >= need, 30, "frames after the prompt switch")
    fa, fb = ta.recorded()[:need], tb.recorded()[:need]
    # same seed and prompt: the same stream in both tabs, until B's switch took effect
    assert diff(fa[:n_switch], fb[:n_switch]).max() <= BATCH_NOISE
    after = diff(fa[n_switch + 2 * hub.block_pixels:], fb[n_switch + 2 * hub.block_pixels:])
    assert after.max() > BATCH_NOISE and after.mean() > 0.05, (after.max(), after.mean())


def test_full_pool_waits_and_closing_a_tab_frees_it(context, demo):
    hub = demo.hub
    pages = [open_page(context, demo) for _ in range(3)]
    pages[0].click("#start")
    first_tab = tab_of(demo, pages[0])
    # alone, the first stream keeps a rewind point in the pages the pool has left
    wait_until(lambda: first_tab.snapshots, 20, "a rewind point of the first stream")
    pages[1].click("#start")
    # the second stream needs those pages: the rewind point is given up so it can run
    wait_until(lambda: stat(pages[1], "status") == "running", 20, "the second stream to run")
    assert first_tab.snapshots == [] and stat(pages[0], "status") == "running"
    # the pool holds two streams: a third tab waits (its rewind points, if any, are given up first)
    third = pages[2]
    third.click("#start")
    wait_until(lambda: stat(third, "status").startswith("busy, 1 waiting"), 10, "the third tab to wait")
    assert "#1 in line" in stat(third, "status")
    assert frames_shown(third) == 0
    time.sleep(0.5)
    assert stat(third, "status").startswith("busy") and frames_shown(third) == 0
    key = first_tab.key
    # closing a tab ends its session: the waiting tab starts streaming
    pages[0].close()
    wait_until(lambda: key not in hub.tabs, 15, "the closed tab's session to be released")
    assert first_tab.session.status == "cancelled"
    wait_until(lambda: stat(third, "status") == "running", 15, "the waiting tab to start")
    wait_until(lambda: frames_shown(third) > 0, 15, "frames in the formerly waiting tab")
    assert stat(pages[1], "status") == "running"


def test_bad_seed_and_long_prompt_are_refused_in_that_tab(context, demo):
    hub = demo.hub
    page, other = open_page(context, demo), open_page(context, demo)
    errors = page.locator(".toast-body")
    page.fill("#seed input", "1e20")
    page.click("#start")
    wait_until(lambda: errors.filter(has_text="seed must be a whole number from 0 to").count(), 10,
               "the seed message")
    assert "100000000000000000000" in errors.first.inner_text()
    limit = hub.config.max_prompt_chars
    page.fill("#seed input", "3")
    page.fill("#prompt textarea, #prompt input", "x" * (limit + 1))
    page.click("#start")
    wait_until(lambda: errors.filter(has_text=f"the limit is {limit}").count(), 10, "the prompt length message")
    time.sleep(0.3)
    assert not hub.engine.sessions and not any(t.session for t in hub.tabs.values())  # nothing opened
    assert other.locator(".toast-body").count() == 0  # the other tab is not told
    assert "idle" in page.inner_text("#stats")
