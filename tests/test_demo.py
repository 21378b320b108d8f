"""The offline demo, end to end in its reduced (CI) mode."""

from __future__ import annotations

import csv
import json
import shlex

import pytest
from typer.testing import CliRunner

from manifpt_cli.cli import app


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(quick_demo):
    tmp_path, result = quick_demo
    suspects = sorted(p for p in (tmp_path / "suspects").rglob("*.png"))
    with open(tmp_path / "report.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["path"] for row in rows) == sorted(str(p) for p in suspects), "every suspect is a row"
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["rows"]) == len(rows) and (tmp_path / "report.csv.meta.json").is_file()

    classes = {p.parent.name for p in suspects}
    assert len(classes) == 6  # five zoo generators from four families, and real
    accuracy = sum(row["predicted"] == row["path"].split("/")[-2] for row in rows) / len(rows)
    assert accuracy > 1.5 / len(classes), f"accuracy {accuracy:.2f} is not above chance"
    assert f"accuracy {accuracy:.3f}" in result.stdout
    assert "manifpt attribute" in result.stderr and "manifpt zoo train" in result.stderr
    # The printed commands run as written on the demo's files (they replace them: --overwrite).
    for command in ("manifpt index build", "manifpt attribute"):
        line = next(line.strip() for line in result.stderr.splitlines() if line.strip().startswith(command))
        again = CliRunner().invoke(app, [*shlex.split(line)[1:], "-q"])
        assert again.exit_code == 0, again.stderr
