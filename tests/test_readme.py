"""The README's shell examples run as written on the demo's files (a `--quick` demo here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from manifpt_cli.cli import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
RUNNABLE = "# runs on the demo's files"

# Examples that do not run on the demo's files, by their first line, and why.
NOT_RUN = {
    'pip install -e ".[all,test]"': "installs the package",
    "python3 -m pytest -q": "runs the test suite",
    "manifpt benchmark --index real.h5 --source jpeg=fakes/jpeg": "the paper's protocol, 3 seeds × 15 epochs "
    "× 7 methods, on an earlier release's data (fakes/): a quick run on the demo's files is the next example",
    "manifpt evaluate --artifacts cifar10_artifacts.h5": "needs the GM-CIFAR10 and GM-CelebA datasets",
    "# the real manifold, all four spaces": "needs the GM datasets and ResNet50 weights",
    "# a local Ray instance": "needs a Ray cluster (the [ray] extra)",
    "python3 bench/": "a benchmark (minutes)",
}


def bash_blocks() -> list[list[str]]:
    """Each ```bash block as its lines, backslash continuations joined."""
    blocks = re.findall(r"^```bash\n(.*?)^```", README, re.MULTILINE | re.DOTALL)
    return [block.replace("\\\n", " ").strip().splitlines() for block in blocks]


def test_every_example_is_run_or_says_why_not():
    for lines in bash_blocks():
        if lines[0] != RUNNABLE:
            assert any(lines[0].startswith(first) for first in NOT_RUN), f"not run and not listed: {lines[0]}"
    assert sum(lines[0] == RUNNABLE for lines in bash_blocks()) >= 2


@pytest.mark.slow
def test_examples_run_on_the_demo_files(quick_demo, tmp_path, monkeypatch):
    workdir, _ = quick_demo
    (tmp_path / "demo").symlink_to(workdir)
    monkeypatch.chdir(tmp_path)
    commands = [line for lines in bash_blocks() if lines[0] == RUNNABLE for line in lines[1:]]
    for command in commands:
        if command.startswith("#"):
            continue
        words = shlex.split(command)
        assert words[0] == "manifpt", command
        result = CliRunner().invoke(app, words[1:])
        assert result.exit_code == 0, f"{command}\n{result.stdout}\n{result.stderr}"
