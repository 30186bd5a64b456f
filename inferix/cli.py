"""Command line: ``inferix generate | verify-fixture | bench``, plus the subcommands that higher floors register.

Subcommands from higher floors (``demo``, ``serve``, the toy world's ``toyworld`` and ``train``) register
themselves through the ``inferix.commands`` entry-point group, so the engine never imports them.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
from importlib.metadata import entry_points
from pathlib import Path

__all__ = ["main"]


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="preset (toyworld, tiny, wan2.1-t2v-1.3b, wan2.1-t2v-14b) or a "
                   "checkpoint path; default: the embedded default model")
    p.add_argument("--vae", default=None, help="Wan VAE (diffusers dir or Wan2.1_VAE.pth) for a bare DiT checkpoint")
    p.add_argument("--text-encoder", default=None, help="local UMT5 encoder directory for a bare DiT checkpoint")
    p.add_argument("--decoder", default=None, choices=["taehv"],
                   help="replace a Wan-latent model's VAE decoder: taehv (tiny streaming decoder, needs "
                        "--decoder-weights taew2_1.pth or lighttaew2_1.pth)")
    p.add_argument("--decoder-weights", default=None, help="weights file of --decoder (.pth or .safetensors)")
    p.add_argument("--sampling", default=None, choices=["self_forcing", "causvid"], help="sampler preset override")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--window", type=int, default=-1, help="latent frames attended (incl. the current block); "
                   "0 = no window (global attention); default: the model's")
    p.add_argument("--sink", type=int, default=None, help="first latent frames kept for good")
    p.add_argument("--attention", default=None, choices=["reference", "sdpa", "flex", "triton"],
                   help="attention backend (default: sdpa)")
    p.add_argument("--kv-pages", type=int, default=None,
                   help="KV page pool size (pages = latent frames; a page holds the frame in every cache lane the "
                        "model runs)")
    add_model_option_arg(p)
    p.add_argument("--overlap-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="decode each block on a worker thread (a side CUDA stream on GPUs) while the next block's "
                        "passes run; frames still come in order (default: on with CUDA; off on the CPU, where the "
                        "DiT's and the decoder's threads already share the cores)")
    p.add_argument("--compile", nargs="?", const="default", default=None,
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile the DiT's fixed-shape parts (everything but the paged attention); the first "
                        "blocks of each batch size pay the compile time")
    p.add_argument("--fp8", action="store_true",
                   help="FP8 (e4m3, per-row) weights for the DiT's block Linears: torchao on SM89+ GPUs "
                        "(pip install 'inferix[fp8]'), an exact but slower emulation on other devices")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA only: capture steady-state passes (full window) as CUDA graphs and replay them")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="refuse to start when the KV pool and decode buffers would take more (default: the memory "
                        "the device has free)")


def add_model_option_arg(p: argparse.ArgumentParser) -> None:
    """``--model-option KEY=VALUE`` (repeatable): an option the model's adapter registers (models/adapter.py)."""
    p.add_argument("--model-option", action="append", default=[], metavar="KEY=VALUE", dest="model_option",
                   help="an option the model takes (its adapter registers them), repeatable; an unknown one is "
                        "refused with the list of the options the model takes")


def model_options(a) -> dict:
    """The ``--model-option`` items as {KEY: VALUE}; a malformed one raises UsageError."""
    from inferix.models.adapter import parse_option_text
    try:
        return parse_option_text(getattr(a, "model_option", None))
    except ValueError as e:
        raise UsageError(str(e)) from None


def _parallel_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sp", type=int, default=1, help="Ulysses sequence parallelism over N processes (launch with "
                   "torchrun --nproc-per-node N; docs/multi-gpu.md): each holds 1/N of the tokens and of the KV cache")
    p.add_argument("--cfg-parallel", action="store_true", help="models sampled with classifier-free guidance: run "
                   "the conditional and unconditional passes on two groups of --sp processes (2 x N in all)")
    p.add_argument("--dist-timeout", type=float, default=None, help="seconds a process waits for the others in one "
                   "collective before the run ends with an error (default: INFERIX_DIST_TIMEOUT or 300)")


def _init_parallel(a):
    """The process group of a --sp / --cfg-parallel run (None for one process); bad values raise UsageError."""
    from .parallel import init_parallel
    try:
        return init_parallel(a.sp, a.cfg_parallel, timeout_s=a.dist_timeout)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _end_rank(par, code: int) -> int:
    """A parallel run that failed ends this process at once (no teardown waiting on a dead peer)."""
    if par is not None:
        if code not in (0, 130):
            from .parallel import exit_now
            exit_now(code)
        par.close()
    return code


class UsageError(ValueError):
    """A bad command-line value, found before any work."""


def _check_device(name: str | None):
    """The device to run on: cuda when available unless named; an unknown or absent one is refused at once."""
    import torch
    if name is None:
        from .defaults import default_device
        return default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name!r}: Inferix runs on cpu or cuda")
    return name


def _load_bundle(a, device, dtype):
    """load_model with every failure of a user-named model turned into one line that names it."""
    from inferix.models.bundle import load_model
    from inferix.models.tensor_files import CheckpointError
    from .api import default_model
    model = a.model or default_model()
    try:
        return load_model(model, device=device, dtype=dtype, vae=a.vae, text_encoder=a.text_encoder,
                          sampling=a.sampling, decoder=a.decoder, decoder_weights=a.decoder_weights)
    except (FileNotFoundError, UsageError, CheckpointError, ValueError):  # these name the problem already
        raise
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - a file that is no model can fail in many ways; name it
        raise UsageError(f"cannot load model {str(model)!r}: {type(e).__name__}: {e}") from e


def _build_engine(a, *, max_sessions: int = 1, frames: int | None = None, prompt: str = "", seed: int = 0,
                  parallel=None):
    from .defaults import resolve_engine_defaults
    from .engine import Engine
    device = _check_device(a.device)
    if parallel is not None and parallel.device.type == "cuda":  # one GPU per rank: the one torchrun gave it
        device = str(parallel.device)
    if a.window < -1:
        raise UsageError(f"--window must be >= 0 (0: no window), got {a.window}")
    if a.kv_pages is not None and a.kv_pages <= 0:
        raise UsageError(f"--kv-pages must be positive, got {a.kv_pages}")
    base = resolve_engine_defaults(device=device, dtype=a.dtype)  # what loading needs
    options = model_options(a)
    bundle = _load_bundle(a, base.device, base.dtype)
    restored = getattr(a, "restored_options", None)
    if restored is not None:  # a restored stream runs with the options it was made with
        options.update(restored(bundle))
    # the pool, unless given: the pages the sessions can hold at once, no more (what each session reserves)
    d = resolve_engine_defaults(bundle, window=a.window, sink=a.sink, kv_pages=a.kv_pages, max_sessions=max_sessions,
                                device=base.device, dtype=base.dtype, num_frames=frames, start_prompt=prompt,
                                start_seed=seed)
    return Engine(bundle, device=d.device, height=a.height, width=a.width, window=d.window, sink=d.sink,
                  attention=a.attention, max_sessions=max_sessions, kv_pages=d.kv_pages,
                  model_options=options,
                  memory_limit_gib=a.memory_limit_gib, overlap_decode=a.overlap_decode, compile=a.compile,
                  cuda_graphs=a.cuda_graphs, fp8=a.fp8, parallel=parallel)

def _keyboard_mouse_token(tok: str) -> dict:
    """'wa' / 'wa@0:0.1' / '_@0.1:0' -> {"keys": "wa", "mouse": [0.0, 0.1]} ('_' or nothing: no key held)."""
    keys, _, mouse = tok.partition("@")
    keys = "" if keys.strip() in ("", "_") else keys.strip()
    out = {"keys": keys}
    if mouse:
        try:
            pitch, yaw = (float(v) for v in mouse.split(":"))
        except ValueError:
            raise UsageError(f"--actions: {tok!r}: the mouse part is PITCH:YAW (two numbers), e.g. wa@0:0.1") from None
        out["mouse"] = [pitch, yaw]
    return out


def _parse_actions(text: str | None, eng) -> list | None:
    """'right,right,down' -> one action per block, the last one held; None for models without actions.
    Keyboard-and-mouse models: 'w,wa@0:0.1,_@0.1:0' (held keys, then @pitch:yaw camera deltas per pixel frame) per
    block, or a .json file holding one action per pixel frame ({"keys": ..., "mouse": [pitch, yaw]})."""
    controls = eng.adapter.controls()
    if controls is None:
        if text:
            raise SystemExit(f"error: model {eng.bundle.name!r} takes no actions")
        return None
    if controls["type"] == "keyboard_mouse":
        if not text:
            return None
        if text.endswith(".json"):
            try:
                per_pixel = json.loads(Path(text).read_text())
            except (OSError, ValueError) as e:
                raise UsageError(f"--actions {text}: {e}") from None
            if not isinstance(per_pixel, list) or not per_pixel:
                raise UsageError(f"--actions {text}: expected a JSON list of actions, one per pixel frame")
            for i, act in enumerate(per_pixel):
                try:
                    eng.action_id(act)
                except ValueError as e:
                    raise UsageError(f"--actions {text}: frame {i}: {e}") from None
            return [("pixel", per_pixel)]
        per_block = []
        for tok in text.split(","):
            act = _keyboard_mouse_token(tok.strip())
            try:
                eng.action_id(act)
            except ValueError as e:
                raise UsageError(f"--actions: {tok.strip()!r}: {e}") from None
            per_block.append(act)
        return per_block
    names = eng.actions or [str(i) for i in range(eng.dit.config.num_actions)]
    if not text:  # a scripted tour so the default video shows the world reacting
        text = ",".join(["right"] * 4 + ["down"] * 4 + ["left"] * 4 + ["up"] * 4) if "right" in names else None
        if text is None:
            return None
    per_block = []
    for tok in text.split(","):
        tok = tok.strip()
        try:
            per_block.append(eng.action_id(int(tok) if tok.isdigit() else tok))
        except ValueError:
            raise UsageError(f"--actions: unknown action {tok!r}; {eng.bundle.name!r} knows {', '.join(names)}") \
                from None
    return per_block


def _start_image(a, eng) -> dict:
    """--image for models that start from an image: {"init_image": uint8 [H, W, 3]} (--fit-image resizes and crops
    it to the engine's size); {} when none is given (the model says whether it needs one)."""
    path = getattr(a, "image", None)
    if path is None:
        if eng.adapter.takes_image:
            raise UsageError(f"model {eng.bundle.name!r} starts from an image: pass --image PATH "
                             f"({eng.width}x{eng.height}, or any size with --fit-image)")
        return {}
    if not eng.adapter.takes_image:
        raise UsageError(f"--image: model {eng.bundle.name!r} takes no start image")
    from PIL import Image
    try:
        img = Image.open(path).convert("RGB")
    except OSError as e:
        raise UsageError(f"--image {path}: not a readable image ({e})") from None
    if getattr(a, "fit_image", False) and img.size != (eng.width, eng.height):
        from PIL import ImageOps
        img = ImageOps.fit(img, (eng.width, eng.height), method=Image.BICUBIC)
    import numpy as np
    return {"init_image": np.asarray(img, dtype=np.uint8)}


def _restore_settings(a) -> dict:
    """--restore: read the snapshot before the model loads (a bad file fails first) and take the engine settings
    it was made with, so only the model has to be named again."""
    from .snapshot import read_snapshot
    header, _ = read_snapshot(a.restore)
    eng, sess = header["engine"], header["session"]
    a.height, a.width, a.sink = eng["height"], eng["width"], eng["sink"]
    a.window = 0 if eng["window"] is None else eng["window"]
    a.kv_pages = a.kv_pages or dict(sess["seq"]["dict"])["budget"]
    # the model options in force then (older snapshots kept them beside the other settings)
    a.restored_options = lambda bundle: (eng["model_options"] if "model_options" in eng else
                                         {o.name: eng[o.name] for o in bundle.adapter.options if o.name in eng})
    return sess


def _blocks(sess, snapshot: str | None, at: int):
    """The session's frame blocks as they come; with ``snapshot``, its state is written once, at the first block
    boundary after ``at`` pixel frames."""
    pending = [snapshot] if snapshot else []

    def maybe_snapshot(s):
        if pending and s.frames_out >= at and s.at_block_boundary and s.status == "running":
            s.snapshot(pending[0])
            print(f"\nsnapshot after {s.frames_out} frames written to {pending.pop()}", file=sys.stderr)
    try:
        yield from sess.stream(between_steps=maybe_snapshot)
    finally:
        if not sess.done and sess.status not in ("finished", "failed"):
            sess.cancel()


def cmd_generate(a) -> int:
    par = None
    try:
        par = _init_parallel(a)
    except (UsageError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if par is not None and (a.snapshot or a.restore):
        print("error: --snapshot and --restore do not run with --sp / --cfg-parallel (each rank holds only its share "
              "of the KV cache)", file=sys.stderr)
        return _end_rank(par, 2)
    try:
        return _end_rank(par, _generate(a, par))
    except BaseException as e:
        if par is None:
            raise
        print(f"error: rank {par.rank}: {type(e).__name__}: {e}", file=sys.stderr)
        return _end_rank(par, 1)


def _generate(a, par) -> int:
    from tqdm import tqdm
    from .parallel import DiscardWriter
    from .sinks import VideoWriter
    from .engine import check_seed
    from .sinks import check_output_file
    try:  # every argument is checked before the model loads
        if a.frames <= 0:
            raise UsageError(f"--frames must be positive, got {a.frames}")
        check_seed(a.seed)
        if "://" not in a.out:
            check_output_file(a.out, "--out")
        if a.profile:
            check_output_file(a.profile, "--profile")
        if a.snapshot:
            check_output_file(a.snapshot, "--snapshot")
            if a.restore:
                raise UsageError("--snapshot and --restore do not go together")
        restored = _restore_settings(a) if a.restore else None
        eng = _build_engine(a, frames=a.frames, prompt=a.prompt, seed=a.seed, parallel=par)
        acts = None if restored else _parse_actions(a.actions, eng)
        sess = eng.restore(a.restore) if restored else None
    except (OSError, ValueError, TypeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if restored:
        sess.resume()
        total = (sess.num_frames - sess.frames_out) if sess.num_frames is not None else a.frames
    else:
        total = a.frames
    actions = None
    if acts and isinstance(acts[0], tuple) and acts[0][0] == "pixel":  # one action per pixel frame, as given
        actions = acts[0][1]
    elif acts:
        per_block_px = eng.bundle.pixel_frames(eng.block_frames)
        actions = [acts[min(i // per_block_px, len(acts) - 1)] for i in range(a.frames)]
    if sess is None:
        try:
            sess = eng.open_session(a.prompt, num_frames=a.frames, seed=a.seed, actions=actions,
                                    **_start_image(a, eng))
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    monitor = None
    if a.monitor_drift:
        from .drift import DriftMonitor
        monitor = DriftMonitor(chunk_frames=max(1, a.frames // 10), num_chunks=10)
    follower = par is not None and not par.is_leader  # only rank 0 writes and reports; the others compute with it
    if follower:
        a.profile, monitor = None, None
    bar = tqdm(total=total, unit="frame", desc=f"{eng.bundle.name} {eng.width}x{eng.height}", disable=follower)
    writer = DiscardWriter() if follower else VideoWriter(a.out, fps=eng.fps)
    interrupted = False
    old = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        for block in _blocks(sess, a.snapshot, a.snapshot_at if a.snapshot_at is not None else a.frames // 2):
            writer.write(block)
            bar.update(len(block))
            if monitor is not None:
                rep = monitor.update(block)
                if rep:
                    bar.write("drift: " + json.dumps(rep))
        path = writer.close()
    except KeyboardInterrupt:
        interrupted = True
        if writer.frames:
            path = writer.close()  # keep what was made: a valid, shorter video
            print(f"\ninterrupted: wrote {writer.frames} frames to {path}", file=sys.stderr)
        else:
            writer.abort()
            print("\ninterrupted before any frame: no file written", file=sys.stderr)
    except BaseException as e:
        writer.abort()
        bar.close()
        print(f"error: generation failed ({type(e).__name__}: {e}); {a.out} was not written", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, old)
    bar.close()
    if follower:
        return 130 if interrupted else 0
    if not interrupted:
        print(f"wrote {writer.frames} frames ({writer.frames / eng.fps:.1f} s at {eng.fps} fps) to {path}")
    if monitor is not None:
        print("drift summary: " + json.dumps(monitor.summary()))
    if a.profile is not None:
        out = a.profile or (str(a.out) + ".profile.json")
        s = eng.profiler.write(out)
        print(json.dumps(s, indent=2))
        print(f"profile written to {out}")
    return 130 if interrupted else 0


def cmd_verify(a) -> int:
    from .fixture import verify_fixture
    from .parallel import ParallelError
    par = None
    try:
        par = _init_parallel(a)
        r = verify_fixture(a.dir, attention=a.attention, tol=a.tol, parallel=par,
                           device=par.device if par is not None else "cpu")
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return _end_rank(par, 2)
    except (ParallelError, RuntimeError) as e:
        if par is None:
            raise
        print(f"error: rank {par.rank}: {e}", file=sys.stderr)
        return _end_rank(par, 1)
    if par is not None and not par.is_leader:  # rank 0 reports; every rank ends with the same verdict
        return _end_rank(par, 0 if r["passed"] else 1)
    print(json.dumps(r, indent=2))
    verdict = "PASS" if r["passed"] else "FAIL"
    print(f"{verdict}: latents max abs error {r['latents_max_abs_err']:.3g} (tolerance {r['tolerance']:g}) "
          f"with the {r['attention_backend']} attention backend")
    return _end_rank(par, 0 if r["passed"] else 1)


def cmd_bench(a, rest) -> int:
    if a.what == "attention":
        from .bench_attention import main as m
        return m(rest) or 0
    if a.what == "serve":
        from .bench_serve import main as m
        return m(rest) or 0
    from .bench import main as m
    return m([a.what] + rest) or 0


def build_parser():
    p = argparse.ArgumentParser(prog="inferix", description="Block-diffusion video world model engine")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate a video (mp4) from a prompt")
    _engine_args(g)
    g.add_argument("--prompt", default="a sunny meadow", help="text prompt")
    g.add_argument("--frames", type=int, default=64, help="output (pixel) frames")
    g.add_argument("--out", default="video.mp4")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--actions", default=None, help="world models: comma-separated actions, one per block, last held; "
                   "keyboard-and-mouse models: held keys and @pitch:yaw per block (w,wa@0:0.1,_@0.1:0) or a .json "
                   "list of per-pixel-frame actions")
    g.add_argument("--image", default=None, help="start image of an image-conditioned model (Matrix-Game)")
    g.add_argument("--fit-image", action="store_true", help="resize and center-crop --image to the engine's size")
    g.add_argument("--profile", nargs="?", const="", default=None, help="print a profile and write it as JSON")
    g.add_argument("--monitor-drift", action="store_true", help="print per-chunk drift (VDE) while generating")
    g.add_argument("--snapshot", default=None, help="write the session's state to this .safetensors file once, at the "
                   "first block boundary after --snapshot-at frames (docs/snapshots.md)")
    g.add_argument("--snapshot-at", type=int, default=None, help="pixel frames before the snapshot (default: half)")
    g.add_argument("--restore", default=None, help="continue a snapshot: its prompt, seed, actions and engine "
                   "settings; writes the frames it makes from there (name the same --model)")
    _parallel_args(g)
    v = sub.add_parser("verify-fixture", help="replay a reference rollout and compare latents")
    v.add_argument("dir")
    v.add_argument("--attention", default=None, choices=["reference", "sdpa", "flex", "triton"])
    v.add_argument("--tol", type=float, default=None)
    _parallel_args(v)
    # bench passes its arguments (including -h) on to its own parsers
    b = sub.add_parser("bench", help="benchmarks (print JSON)", add_help=False)
    b.add_argument("what", choices=["attention", "generate", "engine", "serve"])
    for ep in entry_points(group="inferix.commands"):
        try:
            ep.load()(sub)
        except Exception as e:  # a broken plugin must not take the engine's CLI down
            print(f"warning: command plugin {ep.name!r} failed to load: {e}", file=sys.stderr)
    return p


def main(argv=None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C outside a generation loop (e.g. while the model loads)
        print("\ninterrupted", file=sys.stderr)
        return 130


def _main(argv=None) -> int:
    p = build_parser()
    a, rest = p.parse_known_args(argv)
    if rest and a.cmd != "bench":  # bench passes its own arguments on
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if a.cmd == "generate":
        return cmd_generate(a)
    if a.cmd == "verify-fixture":
        return cmd_verify(a)
    if a.cmd == "bench":
        return cmd_bench(a, rest)
    if hasattr(a, "func"):
        return a.func(a) or 0
    p.error(f"unknown command {a.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
