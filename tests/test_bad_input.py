"""Bad input: each gives one clear line, a non-zero exit, and no partial output."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, base_config, make_images
from trainer.cli import main as cli
from trainer.recipe.config import ConfigError, TrainConfig
from trainer.events import read_events


def train_err(cfg: TrainConfig, tmp_path, capsys) -> tuple[int, str]:
    p = tmp_path / "cfg.toml"
    cfg.save(p)
    code = cli(["train", str(p)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    return code, lines[-1] if lines else err


def no_lora_written(out):
    return not out.exists() or not list(out.rglob("*.safetensors"))


def test_missing_model_file(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    code, msg = train_err(base_config(tmp_path / "nope.safetensors", dataset, out), tmp_path, capsys)
    assert code == 2 and "Base model not found" in msg and "nope.safetensors" in msg
    assert no_lora_written(out)


def test_garbled_model_file(dataset, tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00\x01garbage" * 100)
    out = tmp_path / "run"
    code, msg = train_err(base_config(bad, dataset, out), tmp_path, capsys)
    assert code == 2 and "damaged" in msg and "model.safetensors" in msg
    assert no_lora_written(out)


def test_unknown_architecture(dataset, tmp_path, capsys):
    f = tmp_path / "other.safetensors"
    save_file({"transformer.blocks.0.weight": torch.zeros(4, 4)}, str(f))
    code, msg = train_err(base_config(f, dataset, tmp_path / "run"), tmp_path, capsys)
    assert code == 2 and "Unknown architecture" in msg


def test_folder_that_is_not_a_model(dataset, tmp_path, capsys):
    code, msg = train_err(base_config(dataset, dataset, tmp_path / "run"), tmp_path, capsys)
    assert code == 2 and "model_index.json" in msg


def test_empty_dataset(tiny_sd1, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("hello")
    out = tmp_path / "run"
    code, msg = train_err(base_config(tiny_sd1, empty, out), tmp_path, capsys)
    assert code == 2 and "No usable images" in msg and "10_name" in msg
    assert no_lora_written(out)
    ev = read_events(out)[0]
    assert ev[-1]["type"] == "error" and "No usable images" in ev[-1]["message"]


@pytest.mark.parametrize(
    "change, text",
    [
        ({"rank": 0}, "rank must be a positive"),
        ({"rank": -4}, "rank must be a positive"),
        ({"optimizer": "sgdx"}, "optimizer = 'sgdx' is not one of"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"max_bucket": 256, "resolution": 512}, "max_bucket (256) is below the resolution"),
    ],
)
def test_invalid_config_is_refused_before_loading(change, text, dataset, tmp_path, capsys):
    cfg = base_config(tmp_path / "never-loaded.safetensors", dataset, tmp_path / "run", **change)
    code, msg = train_err(cfg, tmp_path, capsys)
    assert code == 2 and text in msg


def test_unknown_key_in_toml_names_the_key_and_a_suggestion(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('base_model = "x"\nrnak = 4\n')
    with pytest.raises(ConfigError, match="'rnak' \\(did you mean 'rank'\\?\\)"):
        TrainConfig.load(p)


def test_output_dir_not_writable(tiny_sd1, dataset, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, msg = train_err(base_config(tiny_sd1, dataset, blocker / "run"), tmp_path, capsys)
    assert code == 2 and "Cannot write to the output folder" in msg


@pytest.mark.slow
def test_cli_process_prints_one_line_no_traceback(dataset, tmp_path):
    cfg = base_config(tmp_path / "missing.safetensors", dataset, tmp_path / "run")
    cfg.save(tmp_path / "c.toml")
    r = subprocess.run([sys.executable, "-m", "trainer", "train", str(tmp_path / "c.toml")], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: Base model not found")


@pytest.mark.slow  # trains: the fast tier stays under 3 minutes (the full suite runs it)
def test_nan_loss_stops_with_a_cause(tiny_sd1, dataset, tmp_path, capsys):
    # an absurd learning rate blows the loss up; the message names the likely cause
    cfg = base_config(tiny_sd1, dataset, tmp_path / "run", unet_lr=1e12, text_encoder_lr=1e12, max_steps=30, max_grad_norm=0.0)
    code, msg = train_err(cfg, tmp_path, capsys)
    assert code == 2 and "NaN" in msg and "learning rate" in msg


def fake_hub_cache(cache: Path, repo_id: str) -> None:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text("{}")


def test_a_hub_id_offline_is_diagnosed_before_start_and_at_load(tmp_path, monkeypatch):
    """Issue 19.6: 'org/name' offline with no local copy said 'Ready to start', then failed with 'Check the path'."""
    import huggingface_hub.constants

    from app.forms import preflight
    from trainer.models.load import ModelError, load_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "d"
    make_images(data, 1)
    ok, text = preflight({"base_model": "someone/some-model", "dataset": str(data)})
    assert not ok and "not in the local Hugging Face cache" in text and "hf download someone/some-model" in text
    with pytest.raises(ModelError) as e:
        load_model("someone/some-model")
    assert "Check the path" not in str(e.value) and "not in the local Hugging Face cache" in str(e.value)
    fake_hub_cache(tmp_path / "hub", "someone/some-model")
    ok, text = preflight({"base_model": "someone/some-model", "dataset": str(data)})
    assert ok and "is in the local Hugging Face cache" in text, text
    # no network at all (this machine and CI): said as such, without waiting long
    monkeypatch.delenv("HF_HUB_OFFLINE")
    from trainer.models.hub import hub_status

    st = hub_status("someone/other-model", timeout=2)
    assert st.state in ("offline", "missing", "reachable") and st.message
