"""The demo's command line and configuration, without a browser."""
from __future__ import annotations

import argparse
import ast
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_register_adds_demo_command_with_local_defaults():
    from inferix.app.cli import register, run
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["demo"])
    assert a.func is run and a.host == "127.0.0.1" and a.port == 7860 and a.model is None
    a = p.parse_args(["demo", "--model", "tiny", "--host", "0.0.0.0", "--port", "9000", "--max-frames", "64",
                      "--height", "32", "--width", "32"])
    assert (a.model, a.host, a.port, a.max_frames, a.height, a.width) == ("tiny", "0.0.0.0", 9000, 64, 32, 32)
    assert a.mirrors == "" and p.parse_args(["demo", "--mirrors", "hv,d,a"]).mirrors == "hv,d,a"


def test_limit_flags_have_sane_defaults_and_reach_the_config(monkeypatch):
    from inferix.app import cli
    from inferix.app.hub import DemoConfig
    p = argparse.ArgumentParser()
    cli.register(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["demo"])
    assert (a.idle_timeout, a.max_queue, a.max_prompt_chars, a.record_mib_total, a.max_upload_kib) == \
        (300, 8, 2000, 2048, 1024)
    d = DemoConfig()
    assert (d.idle_timeout, d.max_queue, d.max_prompt_chars, d.record_mib_total, d.max_upload_kib) == \
        (300, 8, 2000, 2048, 1024)
    helps = argparse.ArgumentParser()
    cli.add_arguments(helps)
    text = " ".join(helps.format_help().split())
    for flag in ("--idle-timeout", "--max-queue", "--max-prompt-chars", "--record-mib-total", "--max-upload-kib"):
        assert flag in text, flag
    assert "(default 300)" in text and "(default 8)" in text and "(default 2000)" in text
    seen = {}

    def fake_hub(cfg):
        seen["cfg"] = cfg
        raise ValueError("stop here")
    monkeypatch.setattr("inferix.app.hub.Hub", fake_hub)
    a = p.parse_args(["demo", "--idle-timeout", "30", "--max-queue", "0", "--max-prompt-chars", "100",
                      "--record-mib-total", "64.5", "--max-upload-kib", "16"])
    assert a.func(a) == 2
    c = seen["cfg"]
    assert (c.idle_timeout, c.max_queue, c.max_prompt_chars, c.record_mib_total, c.max_upload_kib) == \
        (30, 0, 100, 64.5, 16)


def test_engine_cli_finds_demo_through_entry_point(monkeypatch):
    import inferix.cli as cli
    ep = EntryPoint(name="demo", value="inferix.app.cli:register", group="inferix.commands")
    monkeypatch.setattr(cli, "entry_points", lambda group: [ep] if group == "inferix.commands" else [])
    a, _ = cli.build_parser().parse_known_args(["demo", "--port", "7999"])
    from inferix.app.cli import run
    assert a.cmd == "demo" and a.func is run and a.port == 7999


def test_engine_never_imports_the_app():
    """Layering: inferix/ (the engine) must not import inferix.app; the demo registers itself."""
    offenders = []
    for f in sorted((ROOT / "inferix").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            mods = []
            if isinstance(node, ast.Import):
                mods = [n.name for n in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [("." * node.level) + (node.module or "")]
            offenders += [f"{f.name}: {m}" for m in mods if m.startswith(("inferix.app", "app", ".app", "..app"))]
    assert offenders == []


@pytest.mark.parametrize("kw, msg", [(dict(max_sessions=0), "max_sessions"), (dict(max_frames=-1), "max_frames"),
                                     (dict(snapshot_every=0), "snapshot_every"), (dict(height=-8), "height"),
                                     (dict(max_pixels=0), "max_pixels"), (dict(record_mib=0), "record_mib"),
                                     (dict(idle_timeout=-1), "idle_timeout"), (dict(max_queue=-1), "max_queue"),
                                     (dict(max_prompt_chars=0), "max_prompt_chars"),
                                     (dict(record_mib_total=0), "record_mib_total"),
                                     (dict(max_upload_kib=0), "max_upload_kib"),
                                     (dict(mirrors=("hv", "x")), r"mirrors must be distinct names .*'x'")])
def test_config_rejects_bad_values(kw, msg):
    from inferix.app.hub import DemoConfig
    with pytest.raises(ValueError, match=msg):
        DemoConfig(**kw)


def test_resolution_limit_is_enforced():
    from inferix.app.hub import DemoConfig, Hub
    with pytest.raises(ValueError, match=r"64x64 is over the limit of 1000 pixels per frame"):
        Hub(DemoConfig(model="tiny", device="cpu", max_pixels=1000))


def test_run_reports_bad_model_cleanly(capsys):
    from inferix.app.cli import register
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["demo", "--model", "/no/such/model.json"])
    assert a.func(a) == 2
    assert "no/such/model.json" in capsys.readouterr().err


def test_run_reports_mirrors_the_model_cannot_take(capsys):
    """--mirrors (and --model-option) reach the engine; a model that takes no such option is refused, exit 2."""
    from inferix.app.cli import register
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="cmd"))
    a = p.parse_args(["demo", "--model", "tiny", "--mirrors", "hv", "--device", "cpu"])
    assert a.func(a) == 2
    assert "unknown model option 'mirrors' for model 'tiny'" in capsys.readouterr().err
    a = p.parse_args(["demo", "--model", "tiny", "--model-option", "corrector=on", "--device", "cpu"])
    assert a.func(a) == 2
    assert "unknown model option 'corrector' for model 'tiny'" in capsys.readouterr().err
