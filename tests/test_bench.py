"""Keeps the benchmark command working (2 steps on the tiny model). No timing is asserted."""
import pytest

from trainer.cli import main as cli


@pytest.mark.slow  # a longer training: the full suite runs it, the fast tier does not
def test_bench_runs_two_steps_on_tiny(tmp_path, capsys):
    out = tmp_path / "B.md"
    assert cli(["bench", "--model", "tiny", "--steps", "2", "--warmup", "1", "--which", "reference,ours,lowvram",
                "--repeats", "2", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| reference |" in text and "| ours |" in text and "| lowvram |" in text
    assert text.count("(n=2)") == 3 and "interleaved" in text and "frozen weights get no gradient" in text
    assert "FLOPs per step" in text and "torch " in text


@pytest.mark.slow
def test_the_sdxl_reference_loop_runs(tmp_path, monkeypatch):
    """It crashed without SDXL's added_cond_kwargs (issue 13.7): run it on a tiny SDXL in place of the full one."""
    from trainer.measure import bench
    from trainer.models.load import from_pipeline
    from trainer.models.tiny import build_tiny_pipeline

    monkeypatch.setattr(bench, "build_model", lambda name, device, dtype: from_pipeline(build_tiny_pipeline("sdxl"), "sdxl", "tiny sdxl"))
    out = tmp_path / "B.md"
    assert cli(["bench", "--model", "sdxl", "--resolution", "64", "--batch", "1", "--steps", "1", "--warmup", "1",
                "--which", "reference,ours", "--repeats", "1", "--out", str(out)]) == 0
    assert "| reference |" in out.read_text()


@pytest.mark.slow
def test_the_sweep_bench_compares_one_run_with_runs_in_a_row_and_side_by_side(tmp_path):
    out = tmp_path / "B.md"
    assert cli(["bench", "--model", "tiny", "--sweep", "2", "--steps", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| sweep of 2 variants, one run |" in text and "| 2 runs one after another |" in text
    assert "| 2 runs side by side | - |" in text and "of the memory of 2 runs side by side" in text
    assert "s per cell one generation at a time" in text and "in one batch with an adapter per image" in text


def test_an_unknown_variant_is_named_before_any_work(tmp_path, capsys):
    """`--which ours,kohya` (a typo) ended in a KeyError traceback after the dataset and a model were built."""
    with pytest.raises(SystemExit) as e:
        cli(["bench", "--model", "tiny", "--which", "ours,kohya", "--out", str(tmp_path / "B.md")])
    assert "kohya is not a variant" in str(e.value) and "kohya_cached" in str(e.value)
    assert not (tmp_path / "B.md").exists()
