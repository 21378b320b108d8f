"""The real CLI end to end on real image files: index → extract → train → export → attribute."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from manifpt_cli.cli import app
from manifpt_cli.report import COLUMNS

from .conftest import SOURCES

runner = CliRunner()


def run(*args: str, code: int = 0):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def workflow(dataset, tmp_path_factory) -> dict[str, Path]:
    """Run the whole documented workflow once through the CLI; tests below inspect its outputs."""
    work = tmp_path_factory.mktemp("cli")
    index, artifacts, checkpoint, model = work / "real.h5", work / "art.h5", work / "freq.pt", work / "freq.onnx"
    run("index", "build", dataset / "real", "--out", index, "--space", "rgb,freq", "--size", "32", "-q")
    sources = [arg for name in SOURCES for arg in ("--source", f"{name}={dataset / 'train' / name}")]
    run("extract", "--index", index, *sources, "--out", artifacts, "-q")
    run("train", "--artifacts", artifacts, "--space", "freq", "--epochs", "15", "--out", checkpoint, "-q")
    run("export", checkpoint, "--out", model)

    suspects = work / "suspects"
    shutil.copytree(dataset / "suspects", suspects)
    (suspects / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    odd_name = os.path.join(os.fsencode(suspects / "noise"), b"\xe9t\xe9.png")
    with open(odd_name, "wb") as handle:
        handle.write(next((dataset / "suspects" / "noise").iterdir()).read_bytes())
    return {"work": work, "index": index, "model": model, "suspects": suspects}


def attribute(workflow, *args, suspects=None, code: int = 0):
    """`manifpt attribute` on the workflow's model and index (all its suspects by default)."""
    target = workflow["suspects"] if suspects is None else suspects
    return run("attribute", target, "--model", workflow["model"], "--index", workflow["index"], *args, code=code)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_attribute_csv_report_is_complete_and_accurate(workflow):
    out = workflow["work"] / "report.csv"
    result = attribute(workflow, "--report", "csv", "--out", out, code=3)
    rows = read_csv(out)
    n_files = sum(1 for _ in workflow["suspects"].rglob("*") if _.is_file())
    assert len(rows) == n_files, "every file is a row, the broken one included"
    assert list(rows[0]) == list(COLUMNS)
    errors = [row for row in rows if row["status"] == "error"]
    assert len(errors) == 1 and errors[0]["path"].endswith("broken.jpg") and "corrupt" in errors[0]["error"]
    assert len(errors[0]["sha256"]) == 64
    assert any("\\xe9t\\xe9.png" in row["path"] for row in rows), "non-UTF-8 names are escaped, not dropped"
    scored = [row for row in rows if row["status"] == "ok"]
    accuracy = sum(row["predicted"] == Path(row["path"]).parent.name for row in scored) / len(scored)
    assert accuracy >= 0.6, f"held-out accuracy {accuracy:.2f} (chance is 0.25)"
    for row in scored:
        assert float(row["probability"]) >= float(row["runner_up_probability"])
        assert float(row["manifold_distance"]) > 0 and row["nearest_real"]
    sidecar = json.loads(Path(f"{out}.meta.json").read_text())
    assert sidecar["model_sha256"] and sidecar["index_hash"]
    assert sidecar["classes"] == [*SOURCES, "real"], "extract draws a real class from the index by default"
    rule = sidecar["verdict_rule"]
    assert rule["has_real_class"] and rule["target_fpr"] == 0.05 and sidecar["calibration"]["temperature"] > 0
    for row in scored:
        assert row["verdict"] in (row["predicted"], "unknown", "inconclusive"), row
        assert (row["verdict"] == "unknown") == (float(row["open_set_score"]) < rule["threshold"]) or row["notes"]
    named = [row for row in scored if row["verdict"] == Path(row["path"]).parent.name]
    assert len(named) >= 0.5 * len(scored), "most held-out suspects of known sources keep their source as verdict"
    assert "1 failed" in result.stderr


def test_attribute_json_report_carries_the_header(workflow):
    result = attribute(workflow, "--report", "json", "--top-k", "2", suspects=workflow["suspects"] / "blur")
    report = json.loads(result.stdout)
    assert report["header"]["space"] == "freq" and len(report["header"]["model_sha256"]) == 64
    assert len(report["rows"]) == len(list((workflow["suspects"] / "blur").iterdir()))
    assert all(len(row["top_k"]) == 2 and row["status"] == "ok" for row in report["rows"])


def test_attribute_table_on_the_terminal(workflow):
    folder = workflow["suspects"] / "jpeg"
    rows = json.loads(attribute(workflow, "--report", "json", suspects=folder).stdout)["rows"]
    result = attribute(workflow, suspects=folder)
    assert "predicted" in result.stdout and f"paths relative to {folder}" in result.stdout
    # Every row's predicted-source cell and status cell, not the paths (which contain "jpeg" too).
    for label in {row["predicted"] for row in rows}:
        shown = re.findall(rf"│ {re.escape(label)} +│ \d\.\d{{3}} +│", result.stdout)
        assert len(shown) == sum(row["predicted"] == label for row in rows), label
    assert len(re.findall(r"│ ok +│", result.stdout)) == len(rows) == len(list(folder.iterdir()))
    assert f"{len(rows)} attributed" in result.stderr


def test_model_for_another_index_is_refused(workflow, dataset, tmp_path):
    other = tmp_path / "other.h5"
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted((dataset / "real").iterdir())[:20]:
        shutil.copy(path, few)
    run("index", "build", few, "--out", other, "-q")
    result = run("attribute", workflow["suspects"], "--model", workflow["model"], "--index", other, code=1)
    assert "was not trained on index" in result.stderr and "index hash" in result.stderr


def test_usage_errors_exit_2(workflow):
    result = attribute(workflow, "--report", "pdf", code=2)
    assert "pdf" in result.stderr
    run("index", "build", workflow["suspects"], "--out", workflow["work"] / "x.h5", "--space", "pixels", code=2)


def test_missing_weights_is_a_clear_failure(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    result = run("index", "build", dataset / "real", "--out", tmp_path / "sl.h5", "--space", "sl", code=1)
    assert "--sl-weights" in result.stderr and "TORCH_HOME" in result.stderr
    assert not (tmp_path / "sl.h5").exists()


def test_index_build_with_bad_files_exits_3_and_keeps_the_rest(dataset, tmp_path):
    folder = tmp_path / "real"
    shutil.copytree(dataset / "real", folder)
    (folder / "zero.png").write_bytes(b"")
    result = run("index", "build", folder, "--out", tmp_path / "r.h5", "-q", code=3)
    assert "zero.png" in result.stderr and "empty file" in result.stderr
    info = run("index", "info", tmp_path / "r.h5")
    assert f"n_images         {len(list((dataset / 'real').iterdir()))}" in info.stdout


def test_feature_space_workflow_with_random_weights(dataset, tmp_path):
    """sl end to end (random backbone, asked for explicitly), attribution through the exported backbone."""
    real, fakes = tmp_path / "real", tmp_path / "fakes"
    for folder, files in ((real, sorted((dataset / "real").iterdir())[::25]), (fakes, [])):
        folder.mkdir()
        for path in files:
            shutil.copy(path, folder)
    for name in ("blur", "noise"):
        (fakes / name).mkdir()
        for path in sorted((dataset / "suspects" / name).iterdir())[:4]:
            shutil.copy(path, fakes / name)
    index, art, ckpt, model = (tmp_path / n for n in ("sl.h5", "sl_art.h5", "sl.pt", "sl.onnx"))
    run("index", "build", real, "--out", index, "--space", "sl", "--weights", "random:0", "-q")
    run(
        "extract",
        "--index",
        index,
        "--source",
        f"blur={fakes / 'blur'}",
        "--source",
        f"noise={fakes / 'noise'}",
        "--out",
        art,
        "-q",
    )
    run("train", "--artifacts", art, "--space", "sl", "--epochs", "2", "--batch-size", "4", "--out", ckpt, "-q")
    run("export", ckpt, "--out", model)
    assert (tmp_path / "sl.backbone.onnx").is_file()
    result = run("attribute", fakes, "--model", model, "--index", index, "--report", "json")
    rows = json.loads(result.stdout)["rows"]
    assert len(rows) == 8 and all(row["predicted"] in ("blur", "noise") for row in rows)


def test_empty_suspect_folder_is_a_usage_error(workflow, tmp_path):
    (tmp_path / "empty").mkdir()
    result = attribute(workflow, suspects=tmp_path / "empty", code=2)
    assert "no image files" in result.stderr
    out = workflow["work"] / "threaded.csv"
    attribute(
        workflow,
        "--report",
        "csv",
        "--out",
        out,
        "--workers",
        "2",
        "--threads",
        "1",
        suspects=workflow["suspects"] / "blur",
    )
    assert len(read_csv(out)) == len(list((workflow["suspects"] / "blur").iterdir()))
