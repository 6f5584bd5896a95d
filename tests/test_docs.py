"""The README stays true: its config reference is the generated one, its commands are the CI's."""
from conftest import ROOT
from trainer.cli import config_reference


def test_readme_config_reference_is_generated():
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- config-reference:start -->\n", 1)[1].split("\n<!-- config-reference:end -->", 1)[0]
    assert block == config_reference(), "run: python -m trainer config-reference, and paste into README.md"


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = "python -m pip install -r requirements.txt && python launch.py"
    test = "python -m pip install -r requirements-test.txt && python -m pytest"
    assert install in readme and test in readme
    assert "python -m pip install -q -r requirements.txt" in ci
    assert ci.strip().splitlines()[-1] == test
