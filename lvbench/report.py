"""results.json, results.csv and report.html (per-chunk drift plots drawn with Pillow), written atomically."""
from __future__ import annotations

import csv
import datetime as _dt
import html
import io
import json
import math
import os
import re
import tempfile

from PIL import Image, ImageDraw, ImageFont

FORMAT = "inferix.lvbench/1"
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


# ------------------------------------------------------------------------------------------------ writing
def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: a reader never
    sees a half-written file, and an interrupted run leaves the previous file intact."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(x):
    """Strict JSON: non-finite floats become the strings 'inf', '-inf', 'nan'; numpy scalars become floats."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.{digits}g}"
    return str(v)


# ------------------------------------------------------------------------------------------------ plots
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def line_plot_png(series: dict[str, list[float]], title: str, ylabel: str, width: int = 640,
                  height: int = 360, hline: float | None = None) -> bytes:
    """A small line chart (x = chunk 1..N) as PNG bytes. Non-finite points are skipped."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    f_small, f_title = _font(11), _font(14)
    left, right, top, bottom = 64, 150, 30, 40
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    pts = [v for s in series.values() for v in s if v is not None and math.isfinite(v)]
    if hline is not None:
        pts.append(hline)
    lo, hi = (min(pts), max(pts)) if pts else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    n = max([len(s) for s in series.values()] + [1])

    def px(i, v):  # chunk index i (0-based) and value -> pixel
        x = x0 + (x1 - x0) * (i / (n - 1) if n > 1 else 0.5)
        return x, y1 - (y1 - y0) * (v - lo) / (hi - lo)

    d.text((x0, 6), f"{title}   [{ylabel}]", fill="black", font=f_title)
    d.rectangle([x0, y0, x1, y1], outline=(80, 80, 80))
    for k in range(5):  # y grid and labels
        v = lo + (hi - lo) * k / 4
        _, y = px(0, v)
        d.line([x0, y, x1, y], fill=(225, 225, 225))
        d.text((4, y - 6), _fmt(v, 3), fill="black", font=f_small)
    for i in range(n):  # x ticks
        x, _ = px(i, lo)
        d.line([x, y1, x, y1 + 4], fill="black")
        d.text((x - 3, y1 + 6), str(i + 1), fill="black", font=f_small)
    d.text(((x0 + x1) // 2 - 20, height - 16), "chunk", fill="black", font=f_small)
    if hline is not None:
        _, y = px(0, hline)
        for xs in range(x0, x1, 8):
            d.line([xs, y, min(xs + 4, x1), y], fill=(120, 120, 120))
    for j, (name, s) in enumerate(series.items()):
        col = PALETTE[j % len(PALETTE)]
        seg = []
        for i, v in enumerate(s):
            if v is None or not math.isfinite(v):
                if len(seg) > 1:
                    d.line(seg, fill=col, width=2)
                seg = []
                continue
            p = px(i, v)
            seg.append(p)
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=col)
        if len(seg) > 1:
            d.line(seg, fill=col, width=2)
        ly = y0 + 4 + 16 * j
        d.line([x1 + 10, ly + 6, x1 + 28, ly + 6], fill=col, width=3)
        d.text((x1 + 32, ly), name, fill="black", font=f_small)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def drift_series(record: dict) -> dict[str, list[float]]:
    """m_i / m_1 per metric (the quantity VDE weighs); metrics with m_1 = 0 are left out."""
    out = {}
    for m, r in record.get("metrics", {}).items():
        s = r["chunk_scores"]
        if s and s[0] not in (0, 0.0) and math.isfinite(s[0]):
            out[m] = [v / s[0] for v in s]
    return out


# ------------------------------------------------------------------------------------------------ report
def _slug(i: int, path: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(os.path.basename(path))[0]).strip("._")
    return f"{i:04d}_{base or 'video'}"


def write_results(out_dir: str, records: list[dict], config: dict, summary: dict) -> dict:
    """Write results.json, results.csv, report.html and plots/*.png under ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    metrics = list(config.get("metrics", []))
    n_chunks = int(config.get("num_chunks", 0))
    doc = {"format": FORMAT, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "config": config, "summary": summary, "videos": records}
    paths = {"json": os.path.join(out_dir, "results.json"), "csv": os.path.join(out_dir, "results.csv"),
             "html": os.path.join(out_dir, "report.html")}
    atomic_write_text(paths["json"], json.dumps(jsonable(doc), indent=2, allow_nan=False) + "\n")

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "status", "reason", "metric", "backend", "vde"] + [f"chunk_{i + 1}" for i in range(n_chunks)])
    for r in records:
        if r["status"] != "ok":
            w.writerow([r["path"], r["status"], r.get("reason") or "", "", "", ""])
            continue
        for m, res in r["metrics"].items():
            w.writerow([r["path"], "ok", "", m, res["backend"], _fmt(res["vde"], 8)]
                       + [_fmt(v, 8) for v in res["chunk_scores"]])
    atomic_write_text(paths["csv"], buf.getvalue())

    plot_dir = os.path.join(out_dir, "plots")
    plots = {}
    for i, r in enumerate(records):
        if r["status"] != "ok":
            continue
        slug = _slug(i, r["path"])
        series = drift_series(r)
        if series:
            rel = f"plots/{slug}_drift.png"
            atomic_write_bytes(os.path.join(out_dir, rel),
                               line_plot_png(series, os.path.basename(r["path"]), "m_i / m_1", hline=1.0))
            plots[i] = [rel]
        gt = r.get("ground_truth")
        if gt and gt.get("chunk_psnr"):
            rel = f"plots/{slug}_psnr.png"
            atomic_write_bytes(os.path.join(out_dir, rel),
                               line_plot_png({"PSNR (dB)": gt["chunk_psnr"]}, "PSNR vs simulator", "dB"))
            plots.setdefault(i, []).append(rel)
            if gt.get("chunk_position_error"):
                rel = f"plots/{slug}_position.png"
                atomic_write_bytes(os.path.join(out_dir, rel),
                                   line_plot_png({"position error": gt["chunk_position_error"]},
                                                 "Agent position error vs simulator", "distance"))
                plots[i].append(rel)
    os.makedirs(plot_dir, exist_ok=True)
    atomic_write_text(paths["html"], render_html(records, config, summary, metrics, plots))
    return paths


_CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 20px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}th{background:#f3f3f3}
td.l,th.l{text-align:left}.failed{color:#b00}.note{color:#555;font-size:13px;max-width:60em}img{margin:4px 8px 4px 0}"""


def render_html(records, config, summary, metrics, plots) -> str:
    e = html.escape
    ok = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] != "ok"]
    h = [f"<!doctype html><html><head><meta charset='utf-8'><title>LV-Bench VDE report</title><style>{_CSS}</style>"
         "</head><body><h1>LV-Bench VDE report</h1>",
         f"<p class='note'>{len(records)} videos: {len(ok)} evaluated, {len(failed)} failed. "
         f"{e(str(config.get('num_chunks')))} chunks, {e(str(config.get('weighting')))} weights, "
         f"backend choice <b>{e(str(config.get('backend')))}</b>. VDE = &Sigma;<sub>i=2..N</sub> w<sub>i</sub>"
         " |m<sub>i</sub> &minus; m<sub>1</sub>| / |m<sub>1</sub>|; lower is better; <i>inf</i> means the first "
         "chunk scored 0. Weight-free backends are stand-ins for the protocol's models: compare numbers only "
         "between runs with the same backends.</p>",
         "<h2>Summary</h2><table><tr><th class='l'>metric</th><th class='l'>backend</th><th>videos</th>"
         "<th>inf</th><th>mean VDE</th><th>median VDE</th></tr>"]
    for m in metrics:
        s = summary.get(m, {})
        h.append(f"<tr><td class='l'>{e(m)}</td><td class='l'>{e(', '.join(s.get('backends', [])))}</td>"
                 f"<td>{s.get('videos', 0)}</td><td>{s.get('infinite', 0)}</td>"
                 f"<td>{_fmt(s.get('mean_vde'))}</td><td>{_fmt(s.get('median_vde'))}</td></tr>")
    h.append("</table><h2>Videos</h2><table><tr><th class='l'>video</th><th class='l'>status</th><th>frames</th>"
             + "".join(f"<th>VDE {e(m)}</th>" for m in metrics) + "</tr>")
    for r in records:
        if r["status"] == "ok":
            cells = "".join(f"<td>{_fmt(r['metrics'][m]['vde']) if m in r['metrics'] else ''}</td>" for m in metrics)
            h.append(f"<tr><td class='l'>{e(r['path'])}</td><td class='l'>ok</td><td>{r['num_frames']}</td>"
                     f"{cells}</tr>")
        else:
            h.append(f"<tr><td class='l'>{e(r['path'])}</td><td class='l failed' colspan='{len(metrics) + 2}'>"
                     f"failed: {e(str(r.get('reason')))}</td></tr>")
    h.append("</table>")

    gts = [(i, r) for i, r in enumerate(records) if r["status"] == "ok" and r.get("ground_truth")]
    if gts:
        h.append("<h2>Ground truth (simulator)</h2><table><tr><th class='l'>video</th><th>mean PSNR (dB)</th>"
                 "<th>PSNR VDE</th><th>final position error</th></tr>")
        for _, r in gts:
            g = r["ground_truth"]
            if "error" in g:
                h.append(f"<tr><td class='l'>{e(r['path'])}</td><td class='l failed' colspan='3'>"
                         f"{e(str(g['error']))}</td></tr>")
                continue
            h.append(f"<tr><td class='l'>{e(r['path'])}</td><td>{_fmt(g.get('mean_psnr'))}</td>"
                     f"<td>{_fmt(g.get('psnr_vde'))}</td><td>{_fmt(g.get('final_position_error'))}</td></tr>")
        h.append("</table>")

    h.append("<h2>Per-chunk scores</h2>")
    for i, r in enumerate(records):
        if r["status"] != "ok":
            continue
        h.append(f"<h3>{e(r['path'])}</h3>")
        for rel in plots.get(i, []):
            h.append(f"<img src='{e(rel)}' alt='{e(rel)}'>")
        n = max((len(v["chunk_scores"]) for v in r["metrics"].values()), default=0)
        h.append("<table><tr><th class='l'>metric</th><th class='l'>backend</th><th>VDE</th>"
                 + "".join(f"<th>{k + 1}</th>" for k in range(n)) + "</tr>")
        for m, v in r["metrics"].items():
            h.append(f"<tr><td class='l'>{e(m)}</td><td class='l'>{e(v['backend'])}</td><td>{_fmt(v['vde'])}</td>"
                     + "".join(f"<td>{_fmt(x)}</td>" for x in v["chunk_scores"]) + "</tr>")
        g = r.get("ground_truth")
        if g and "chunk_psnr" in g:
            h.append("<tr><td class='l'>PSNR (GT)</td><td class='l'>simulator</td>"
                     f"<td>{_fmt(g.get('psnr_vde'))}</td>"
                     + "".join(f"<td>{_fmt(x)}</td>" for x in g["chunk_psnr"]) + "</tr>")
            if g.get("chunk_position_error"):
                h.append("<tr><td class='l'>position error (GT)</td><td class='l'>simulator</td><td></td>"
                         + "".join(f"<td>{_fmt(x)}</td>" for x in g["chunk_position_error"]) + "</tr>")
        h.append("</table>")
    h.append("</body></html>\n")
    return "".join(h)
