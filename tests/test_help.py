"""What a newcomer reads: every command's --help, the tables and the error lines."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
import typer
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from manifpt_cli.attribute import AttributionRow
from manifpt_cli.cli import app
from manifpt_cli.cli.attribute import attribution_table
from manifpt_cli.cli.console import label_column, print_table

ROOT = typer.main.get_command(app)
# Options whose default is computed (None in the signature) but must still be shown, in words.
COMPUTED_DEFAULTS = {
    ("extract", "--space"),
    ("extract", "--threads"),
    ("train", "--arch"),
    ("evaluate", "--arch"),
    ("zoo", "train", "--upsample"),
    ("zoo", "train", "--norm"),
    ("zoo", "train", "--loss"),
    ("demo", "--workdir"),
    ("attribute", "--out"),
}


def command_paths(command=ROOT, path=()):
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from command_paths(sub, (*path, name))


def command_at(path):
    command = ROOT
    for name in path:
        command = command.commands[name]
    return command


def help_text(path) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "100"}, terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("path", list(command_paths()), ids=lambda path: " ".join(path) or "manifpt")
def test_help_reads_cleanly(path):
    text = help_text(path)
    assert not re.search(r"\S \.(\s|│|$)", text), "a stray ' .' (a default that markup swallowed)"
    assert "\\[" not in text
    assert not re.search(r"<[a-z][^>]*>", text), "a Python type as a metavar (<bool>, <path>, <list[...]>)"
    assert not re.search(r"\{\w+\}", text), "a Python parameter name in braces"
    options = [p for p in command_at(path).params if p.param_type_name == "option" and not p.is_flag]
    rows = {p.opts[0]: re.search(rf"^│[ *]{{1,5}}{re.escape(p.opts[0])}\s", text, re.MULTILINE) for p in options}
    assert all(rows.values()), rows
    starts = {opt: row.start() for opt, row in rows.items()}
    ends = sorted(starts.values()) + [len(text)]
    for param in options:
        block = text[starts[param.opts[0]] : min(end for end in ends if end > starts[param.opts[0]])]
        if param.default is not None or (*path, param.opts[0]) in COMPUTED_DEFAULTS:
            assert "[default:" in block, f"{param.opts[0]} does not show its default"


def test_commands_are_listed_in_workflow_order():
    text = help_text(())
    listed = re.findall(r"^│ (\w+) ", text[text.index("Commands") :], re.MULTILINE)
    workflow = [
        "index",
        "extract",
        "train",
        "export",
        "attribute",
        "report",
        "verify",
        "evaluate",
        "benchmark",
        "analyze",
        "zoo",
    ]
    assert [name for name in listed if name in workflow] == workflow
    assert listed[-1] == "demo" and set(listed) == set(ROOT.commands)


def test_version_names_the_libraries():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("manifpt ")
    assert "faiss" in result.stdout and "onnxruntime" in result.stdout


def test_shell_completion_lists_commands_in_workflow_order():
    env = {"_MANIFPT_COMPLETE": "complete_bash", "COMP_WORDS": "manifpt ", "COMP_CWORD": "1"}
    result = CliRunner().invoke(app, [], env=env, prog_name="manifpt")
    assert result.stdout.split()[:3] == ["index", "extract", "train"], result.output


LABELS = ["gan-nearest-hinge", "diffusion-unet", "vae-bilinear", "real"]


def demo_like_rows(root: Path) -> list[AttributionRow]:
    rows = []
    for i, source in enumerate(LABELS * 2):
        runner = LABELS[(i + 1) % len(LABELS)]
        rows.append(
            AttributionRow(
                path=str(root / "suspects" / source / f"{source}_{i:05d}.png"),
                sha256="0" * 64,
                predicted=source,
                probability=0.9,
                top_k=[(source, 0.9), (runner, 0.05)],
                verdict="unknown" if i % 3 else source,
                manifold_distance=1234.5,
            )
        )
    return rows


def rendered(table: Table, width: int, terminal: bool) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=terminal, color_system=None)
    print_table(console, table)
    return console.file.getvalue()


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "pipe"])
@pytest.mark.parametrize("width", [80, 120])
def test_tables_keep_every_name_whole(tmp_path, width, terminal):
    rows = demo_like_rows(tmp_path / "a-long-case-folder-name" / "that-goes-on")
    text = rendered(attribution_table(rows), width, terminal)
    assert "…" not in text
    lines = text.splitlines()
    for label in LABELS:
        assert any(f" {label} " in line for line in lines), label
    assert f"paths relative to {tmp_path / 'a-long-case-folder-name' / 'that-goes-on' / 'suspects'}" in " ".join(
        line.strip(" │") for line in lines
    )
    if not terminal:  # a pipe or a file gets each path whole on one line
        for row in rows:
            assert any("/".join(Path(row.path).parts[-2:]) in line for line in lines), row.path
    zoo = Table(label_column("name", LABELS), label_column("family", ["diffusion", "gan"]), "iters", "trained on")
    for label in LABELS:
        zoo.add_row(label, "diffusion", "2000", "800 images")
    text = rendered(zoo, width, terminal)
    assert "…" not in text and all(any(f" {label} " in line for line in text.splitlines()) for label in LABELS)


def test_errors_are_one_line_with_no_blank_line_before(tmp_path):
    missing = tmp_path / ("a-folder-with-a-long-name-" * 4) / "nope.h5"
    result = CliRunner().invoke(app, ["train", "--artifacts", str(missing), "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 2  # a missing input is a usage error
    assert result.stderr.startswith("error: no such artifacts file") and result.stderr.count("\n") == 1
    usage = CliRunner().invoke(app, ["attribute", str(tmp_path), "--model", "m", "--index", "i", "--report", "pdf"])
    assert usage.exit_code == 2 and usage.stderr.startswith("Usage: ") and "\n\n" not in usage.stderr


def test_messages_on_stderr_are_one_line_however_long():
    """A log keeps a message whole: stderr never hard-wraps one (here 500 characters)."""
    from manifpt_cli.cli.console import stderr

    message = "saved " + "x" * 494
    with stderr.capture() as captured:
        stderr.print(message)
    assert stderr.width < len(message) and captured.get() == message + "\n"
