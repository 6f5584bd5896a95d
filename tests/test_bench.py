"""Keeps the benchmark command working (2 steps on the tiny model). No timing is asserted."""
import pytest

from trainer.cli import main as cli


@pytest.mark.slow  # a longer training: the full suite runs it, the fast tier does not
def test_bench_runs_two_steps_on_tiny(tmp_path, capsys):
    out = tmp_path / "B.md"
    assert cli(["bench", "--model", "tiny", "--steps", "2", "--warmup", "1", "--which", "reference,ours,lowvram",
                "--out", str(out)]) == 0
    text = out.read_text()
    assert "| reference |" in text and "| ours |" in text and "| lowvram |" in text
    assert "FLOPs per step" in text and "torch " in text
