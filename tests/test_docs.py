"""The README documents every command, report column and exit code the code has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from manifpt_cli import errors
from manifpt_cli.cli import app
from manifpt_cli.report import COLUMNS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
COMMANDS = [
    ["index", "build"],
    ["index", "info"],
    ["extract"],
    ["train"],
    ["export"],
    ["attribute"],
    ["report"],
    ["enroll"],
    ["verify"],
    ["zoo", "train"],
    ["zoo", "sample"],
    ["zoo", "list"],
    ["demo"],
    ["evaluate"],
    ["benchmark"],
    ["analyze", "clusters"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_and_is_in_the_readme(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.stdout
    assert f"manifpt {' '.join(command)}" in README


def test_report_columns_are_documented():
    for column in COLUMNS:
        assert f"`{column}`" in README, column


def test_exit_codes_are_documented():
    for code in (errors.EXIT_OK, errors.EXIT_FAILURE, errors.EXIT_USAGE, errors.EXIT_PARTIAL):
        assert re.search(rf"^\| {code} \|", README, re.MULTILINE), code


def test_readme_commands_are_the_ci_commands():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "python3 -m pytest -q" in ci and "python3 -m pytest -q" in README
    assert '-e ".[all,test]"' in ci and 'pip install -e ".[all,test]" && manifpt demo' in README
    assert "ruff check" in ci and "ruff format --check" in ci
