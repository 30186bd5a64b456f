"""`inferix verify-fixture` on variants of the reference fixtures: no slot layout, broken or missing files."""
import json
import shutil
from pathlib import Path

import pytest

from inferix.cli import main

WINDOW = Path(__file__).parent / "fixtures" / "self_forcing_tiny_window"


def _copy(tmp_path, name="fixture"):
    dst = tmp_path / name
    shutil.copytree(WINDOW, dst, symlinks=False)  # weights.pt is a link into ../self_forcing_tiny
    return dst


def test_rolled_cache_without_layout_compares_final_block_table(tmp_path, capsys):
    """The window fixture's cache rolled (frames 3-11 were evicted and their pages reused); with no
    kv_layer0_k_layout in config.json the keys compared are those of the final table: sink 0-2, then 12-14."""
    folder = _copy(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg.pop("kv_layer0_k_layout")["slot_frames"] == [0, 1, 2, 12, 13, 14]
    (folder / "config.json").write_text(json.dumps(cfg))
    assert main(["verify-fixture", str(folder)]) == 0
    out = capsys.readouterr().out
    r = json.loads(out[: out.rindex("}") + 1])
    assert r["passed"] and "PASS" in out
    assert r["kv_layer0_k_max_abs_err"] <= 1e-4 and r["x0_max_abs_err"] <= 1e-4


@pytest.mark.parametrize("name", ["expected.safetensors", "inputs.safetensors"])
def test_truncated_tensor_file_is_named_in_one_line(tmp_path, capsys, name):
    folder = _copy(tmp_path)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    assert main(["verify-fixture", str(folder)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and not captured.out
    assert str(folder / name) in err and "not a readable safetensors file" in err


def test_missing_or_incomplete_tensor_file(tmp_path, capsys):
    folder = _copy(tmp_path)
    (folder / "expected.safetensors").unlink()
    assert main(["verify-fixture", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{folder / 'expected.safetensors'}: no such file" in err

    from safetensors.torch import load_file, save_file

    exp = load_file(str(WINDOW / "expected.safetensors"))
    del exp["latents"]
    save_file(exp, str(folder / "expected.safetensors"))
    assert main(["verify-fixture", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected.safetensors: no tensor latents" in err


def test_invalid_config_json_is_named(tmp_path, capsys):
    folder = _copy(tmp_path)
    (folder / "config.json").write_text('{"model_kwargs": ')
    assert main(["verify-fixture", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{folder / 'config.json'}: invalid JSON" in err
