"""Forensic integrity on real files: nothing overwritten, nothing silently wrong, nothing lost.

FAISS, HDF5, ONNX Runtime and the images are real; faults are injected only into OS calls
(``os.replace``) or by editing the files the way an adversary or an accident would.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from manifpt_cli import outputs
from manifpt_cli.casework import ReportTarget, run_attribution
from manifpt_cli.cli import app
from manifpt_cli.errors import EXIT_FAILURE, EXIT_USAGE, FormatError
from manifpt_cli.export import export_onnx
from manifpt_cli.images import path_from_display
from manifpt_cli.integrity import ONNX_DIGEST_PLACEHOLDER, IntegrityError, check_stored, seal_onnx
from manifpt_cli.manifold import RealIndex, build_index
from manifpt_cli.report import ReportFormat, unneutralise
from manifpt_cli.settings import SMALL_IMAGE_BATCH_SIZE
from manifpt_cli.spaces import Space

from .conftest import SIZE, finishes, replace_dataset, writer_for

runner = CliRunner()


def cli(*args, code: int | None = 0):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    if code is not None:
        assert result.exit_code == code, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def case(freq_model, real_index, dataset, tmp_path_factory):
    """The session's exported freq model and real index, and a copy of the suspects."""
    work = freq_model
    suspects = tmp_path_factory.mktemp("case") / "suspects"
    shutil.copytree(dataset / "suspects", suspects)
    return {"work": work, "model": work / "freq.onnx", "index": real_index, "suspects": suspects}


def attribute_args(case, out, *extra) -> list:
    """`manifpt attribute` of the case's suspects into a CSV report ``out``."""
    inputs = ["--model", case["model"], "--index", case["index"]]
    return ["attribute", case["suspects"], *inputs, "--report", "csv", "--out", out, *extra]


def attribute_csv(case, out, *extra, code=0):
    return cli(*attribute_args(case, out, *extra), code=code)


# --- 1. never write over an input or an existing result ------------------------------------------


def test_outputs_that_are_inputs_are_refused_before_any_work(case, tmp_path):
    suspect = next((case["suspects"] / "blur").iterdir())
    before = suspect.read_bytes()
    for target in (suspect, case["index"], case["model"]):
        digest = Path(target).read_bytes()
        result = attribute_csv(case, target, "--overwrite", code=EXIT_USAGE)
        assert "refusing to write" in result.stderr and Path(target).read_bytes() == digest
    assert suspect.read_bytes() == before
    # A renamed copy's card still names the backbone exported beside the original: it is kept too.
    model = shutil.copy(case["model"], tmp_path / "case.onnx")
    backbone = tmp_path / "freq.backbone.onnx"
    backbone.write_bytes(b"the backbone another model's card names")
    result = cli(*attribute_args({**case, "model": model}, backbone, "--overwrite"), code=EXIT_USAGE)
    assert "it is the input" in result.stderr and backbone.read_bytes().startswith(b"the backbone")
    result = cli(
        "extract",
        "--index",
        case["index"],
        "--source",
        f"a={case['suspects'] / 'blur'}",
        "--out",
        case["index"],
        "--overwrite",
        code=EXIT_USAGE,
    )
    assert "it is the input" in result.stderr


def test_the_files_a_run_reads_again_are_never_written_over(case, dataset, tmp_path):
    """`report` reads the suspects again, and `--html`, `report` and `extract --real index` may
    read the index's real images again: neither they nor their folders take an output."""
    report = tmp_path / "r.csv"
    attribute_csv(case, report)
    suspect = next((case["suspects"] / "blur").iterdir())
    real = next((dataset / "real").iterdir())
    kept = {path: path.read_bytes() for path in (suspect, real)}
    refused = [
        ("report", report, "--html", suspect, "--overwrite"),
        ("report", report, "--html", case["suspects"] / "new.html"),
        ("report", report, "--html", real, "--overwrite"),
        (*attribute_args(case, tmp_path / "s.csv"), "--html", dataset / "real" / "new.html"),
        (
            "extract",
            "--index",
            case["index"],
            "--source",
            f"a={suspect.parent}",
            "--real",
            "index",
            "--out",
            dataset / "real" / "a.h5",
        ),
    ]
    for args in refused:
        result = cli(*args, code=EXIT_USAGE)
        assert "inside the input folder" in result.stderr, args
    assert {path: path.read_bytes() for path in kept} == kept
    assert not (case["suspects"] / "new.html").exists() and not (dataset / "real" / "new.html").exists()
    assert not (dataset / "real" / "a.h5").exists() and not (tmp_path / "s.csv").exists()


def test_an_output_folder_that_cannot_be_had_is_refused_before_any_work(case, tmp_path, monkeypatch):
    """A file where the folder should be, or a folder this process may not write in (the OS call
    answers EACCES here, as it does for any user but root): one clear line, not a traceback after
    the work."""
    (tmp_path / "r.csv").write_text("a report")
    result = attribute_csv(case, tmp_path / "r.csv" / "x.csv", code=EXIT_USAGE)
    assert f"{tmp_path / 'r.csv'} is a file, not a folder" in result.stderr
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode, **kw: os.fspath(path) != str(locked) and real_access(path, mode, **kw)
    )
    for out in (locked / "r.csv", locked / "new" / "r.csv"):
        result = attribute_csv(case, out, code=EXIT_USAGE)
        assert f"no permission to write in the folder {locked}" in result.stderr
    assert list(locked.iterdir()) == []


def test_a_report_that_fails_to_be_put_in_place_leaves_no_page_drawn_from_it(case, tmp_path, monkeypatch):
    report, page = tmp_path / "r.csv", tmp_path / "case.html"
    real_replace = os.replace

    def replace(src, dst):
        if os.fspath(dst).endswith(".csv"):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(outputs.OutputWriteError):
        run_attribution(
            case["model"],
            case["index"],
            [case["suspects"]],
            reports=[
                ReportTarget(ReportFormat.CSV, report),
                ReportTarget(ReportFormat.HTML, page),
            ],  # as the CLI gives them
        )
    assert list(tmp_path.iterdir()) == [], "neither the report nor its page"


def test_existing_results_need_overwrite_and_folders_are_refused_up_front(case, tmp_path):
    out = tmp_path / "report.csv"
    out.write_text("an earlier report")
    result = attribute_csv(case, out, code=EXIT_USAGE)
    assert "already exists; pass --overwrite" in result.stderr and out.read_text() == "an earlier report"
    attribute_csv(case, out, "--overwrite")
    assert out.read_text().startswith("path,status")

    started = time.perf_counter()
    result = attribute_csv(case, tmp_path, code=EXIT_USAGE)
    assert "existing folder" in result.stderr and time.perf_counter() - started < 5
    result = attribute_csv(case, tmp_path / "typo" / "deeper" / "r.csv", code=EXIT_USAGE)
    assert "does not exist" in result.stderr and not (tmp_path / "typo").exists()
    attribute_csv(case, tmp_path / "new" / "r.csv")  # only the last folder is created
    assert (tmp_path / "new" / "r.csv.meta.json").is_file()


# --- 2. an integrity chain that the run checks ---------------------------------------------------


def _copy(path: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copy(path, target)
    return target


def _edit_vector(handle):
    handle["spaces/freq/embeddings"][3, 7] += 1.0


def _move_blob(handle):
    handle["spaces/freq/search_norms"] = handle["spaces/rgb/search_norms"][...]
    del handle["spaces/rgb/search_norms"]


def _external_link(handle):
    other = Path(handle.filename).with_name("elsewhere.h5")
    with h5py.File(other, "w") as target:
        target["embeddings"] = handle["spaces/freq/embeddings"][...] * 0
    del handle["spaces/freq/embeddings"]
    handle["spaces/freq/embeddings"] = h5py.ExternalLink(str(other), "embeddings")


def _extra_object(handle):
    handle["spaces/freq/note"] = np.zeros(3)


def _edit_factory(handle):
    handle["spaces/freq"].attrs["faiss_factory"] = "IVF4,Flat"


@pytest.mark.parametrize(
    "tamper", [_edit_vector, _move_blob, _external_link, _extra_object, _edit_factory], ids=lambda f: f.__name__[1:]
)
def test_tampered_index_is_refused(case, tmp_path, tamper):
    index = _copy(case["index"], tmp_path, "tampered.h5")
    with h5py.File(index, "r+") as handle:
        tamper(handle)
    result = cli("attribute", case["suspects"], "--model", case["model"], "--index", index, code=EXIT_FAILURE)
    assert "Traceback" not in result.stderr and (
        "digest" in result.stderr
        or "index_hash" in result.stderr
        or "link" in result.stderr
        or "laid out" in result.stderr
    )


def _edit_pixel(group):
    group["embeddings"][2, 5] ^= 1


def _edit_projection(group):
    group["search_projected"][4, 0] = np.nextafter(group["search_projected"][4, 0], np.float32(np.inf))


def _swap_tables(group):
    mean = group["search_mean"][...]
    group["search_mean"][...] = mean[::-1]


def _drop_search(group):
    del group.attrs["search"]


def _drop_layout(group):
    del group.attrs["layout"]


def _edit_stored_bin(group):
    group["embeddings"][1, 3] = np.nextafter(group["embeddings"][1, 3], np.float32(np.inf))


TAMPERED_SEARCH_DATA = [(Space.RGB, f) for f in (_edit_pixel, _edit_projection, _swap_tables, _drop_search)]
TAMPERED_SEARCH_DATA += [(Space.FREQ, f) for f in (_drop_layout, _edit_stored_bin)]


@pytest.mark.parametrize(
    ("space", "tamper"), TAMPERED_SEARCH_DATA, ids=lambda p: p.__name__[1:] if callable(p) else p.value
)
def test_tampered_search_data_is_refused(real_index, tmp_path, space, tamper):
    """Every dataset and layout attribute a space's search reads (rgb's exact-search tables, freq's
    stored half) is covered by the space digest: one edit is refused."""
    index = _copy(real_index, tmp_path, "tampered.h5")
    with h5py.File(index, "r+") as handle:
        tamper(handle[f"spaces/{space.value}"])
    with pytest.raises(IntegrityError, match="digest|laid out"):
        RealIndex(index, verify=[space])
    if tamper is not _drop_search:  # a data edit leaves the other space usable (the layout check is whole-file)
        RealIndex(index, verify=[Space.FREQ if space is Space.RGB else Space.RGB]).close()


def test_a_dataset_not_stored_in_full_in_the_file_is_refused_before_it_is_read(real_index, tmp_path):
    """A header can declare far more rows than the file holds (unwritten chunks read as zeros), or
    keep a dataset's bytes in another file (/dev/zero, a FIFO): the digest would read for hours, or
    for ever. Those, and compressed datasets (not manifpt's either), are refused before any digest
    is read, whichever space is opened; so is a file whose datasets declare more than its size."""
    declared = 2**21  # 6.4 GB of rgb rows, never written: without the check, the digest reads them (and fails later)
    damaged = {
        "unwritten": (
            "spaces/rgb",
            "embeddings",
            {"shape": (declared, 3 * SIZE * SIZE), "chunks": (85, 3 * SIZE * SIZE)},
        ),
        "external": (
            "spaces/rgb",
            "search_norms",
            {"shape": (2**37,), "external": [("/dev/zero", 0, h5py.h5f.UNLIMITED)]},
        ),
        "compressed": ("files", "sha256", {"compression": "gzip"}),
    }
    messages = {
        "unwritten": f"embeddings declares {declared * 3 * SIZE * SIZE:,} bytes but the file stores 0",
        "external": "search_norms keeps its data outside this file",
        "compressed": "sha256 is compressed or filtered",
    }
    for name, (group, dataset, layout) in damaged.items():
        path = _copy(real_index, tmp_path, f"{name}.h5")
        with h5py.File(path, "r+") as handle:
            replace_dataset(handle[group], dataset, **layout)
        for space in (Space.RGB, Space.FREQ):
            with pytest.raises(IntegrityError, match=messages[name]):
                RealIndex(path, verify=[space], searching=[space])
    with h5py.File(real_index) as whole, h5py.File(_copy(real_index, tmp_path, "small.h5"), "w") as small:
        datasets = [whole["spaces/rgb/embeddings"]]
        with pytest.raises(IntegrityError, match="datasets declare .* more than the file's"):
            check_stored(small, datasets, "small.h5")  # the bound on the whole file, where each dataset passes
        check_stored(whole, datasets, "real.h5")


def _replace_failures(handle, name: str, values: list[str]) -> None:
    del handle[f"failures/{name}"]
    handle["failures"].create_dataset(name, data=values, dtype=h5py.string_dtype("utf-8"))


_PROVENANCE = "do not match its provenance_digest"
PROVENANCE_EDITS = {  # name: (edit, what refuses it)
    "created_utc": (lambda handle: handle.attrs.modify("created_utc", "2020-01-01T00:00:00+00:00"), _PROVENANCE),
    "manifpt_version": (lambda handle: handle.attrs.modify("manifpt_version", "9.9.9"), _PROVENANCE),
    "failure reason": (lambda handle: _replace_failures(handle, "error", ["an innocent-looking reason"]), _PROVENANCE),
    "failure removed": (
        lambda handle: [_replace_failures(handle, name, []) for name in ("path", "error")],
        _PROVENANCE,
    ),
    "relabelled format 5": (lambda handle: handle.attrs.modify("format_version", 5), "does not match its index_hash"),
    "digest removed": (lambda handle: handle.attrs.__delitem__("provenance_digest"), _PROVENANCE),
}


def test_provenance_and_failures_are_covered_by_their_digest(dataset, tmp_path):
    """`index info` shows who wrote an index, when, and which files it left out: from format 6 an edit
    to any of them (or relabelling the file as format 5, which has no provenance digest) is refused
    on opening."""
    folder = tmp_path / "real"
    folder.mkdir()
    for path in sorted((dataset / "real").iterdir())[:12]:
        shutil.copy(path, folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    built = tmp_path / "real.h5"
    build_index([folder], built, [Space.RGB])
    RealIndex(built).close()
    for name, (edit, refusal) in PROVENANCE_EDITS.items():
        path = _copy(built, tmp_path, f"{name}.h5")
        with h5py.File(path, "r+") as handle:
            edit(handle)
        with pytest.raises(IntegrityError, match=refusal):
            RealIndex(path).close()
            pytest.fail(f"an index with its {name} edited was opened")


def test_another_real_set_with_the_hash_copied_is_refused(case, dataset, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted((dataset / "real").iterdir())[:30]:
        shutil.copy(path, few)
    other = tmp_path / "other.h5"
    build_index([few], other, [Space.RGB, Space.FREQ])
    with h5py.File(case["index"], "r") as original, h5py.File(other, "r+") as handle:
        handle.attrs["index_hash"] = original.attrs["index_hash"]
    result = cli("attribute", case["suspects"], "--model", case["model"], "--index", other, code=EXIT_FAILURE)
    assert "does not match its index_hash" in result.stderr


def test_an_ivf_index_of_the_same_images_is_not_the_models_index(case, dataset, tmp_path):
    ivf = tmp_path / "ivf.h5"
    build_index([dataset / "real"], ivf, [Space.RGB, Space.FREQ], faiss_factory="IVF4,Flat")
    result = cli("attribute", case["suspects"], "--model", case["model"], "--index", ivf, code=EXIT_FAILURE)
    assert "was not trained on index" in result.stderr


def test_a_flipped_weight_byte_or_edited_card_is_refused(case, tmp_path):
    import onnx

    flipped = _copy(case["model"], tmp_path, "flipped.onnx")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the weights
    flipped.write_bytes(bytes(data))
    result = cli("attribute", case["suspects"], "--model", flipped, "--index", case["index"], code=EXIT_FAILURE)
    assert "does not match its recorded digest" in result.stderr

    proto = onnx.load(str(case["model"]))
    props = {p.key: p for p in proto.metadata_props}
    card = json.loads(props["manifpt"].value)
    card["classes"] = list(reversed(card["classes"]))
    props["manifpt"].value = json.dumps(card)
    onnx.save(proto, str(tmp_path / "reordered.onnx"))
    result = cli(
        "attribute",
        case["suspects"],
        "--model",
        tmp_path / "reordered.onnx",
        "--index",
        case["index"],
        code=EXIT_FAILURE,
    )
    assert "does not match its recorded digest" in result.stderr

    # A card that disagrees with its graph is refused even when its digest is right (a faulty export).
    card["classes"] = card["classes"][:2]
    props["manifpt"].value = json.dumps(card)
    props["manifpt_digest"].value = ONNX_DIGEST_PLACEHOLDER
    onnx.save(proto, str(tmp_path / "short.onnx"))
    seal_onnx(tmp_path / "short.onnx")
    result = cli(
        "attribute", case["suspects"], "--model", tmp_path / "short.onnx", "--index", case["index"], code=EXIT_FAILURE
    )
    assert "model card does not match the model" in result.stderr

    # The digest's value written a second time (where zeroing it for the check would hide an edit).
    twice = _copy(case["model"], tmp_path, "twice.onnx")
    stored = next(p.value for p in onnx.load(str(case["model"])).metadata_props if p.key == "manifpt_digest")
    twice.write_bytes(twice.read_bytes() + stored.encode())
    result = cli("attribute", case["suspects"], "--model", twice, "--index", case["index"], code=EXIT_FAILURE)
    assert "twice.onnx carries its digest's value more than once" in " ".join(result.stderr.split())


def test_a_sealed_model_with_subgraphs_functions_or_custom_operators_is_refused(case, tmp_path):
    """Anyone can seal a file of their own; a model with a Loop (10¹² turns ran for ten minutes and
    ignored SIGTERM), a local function or a custom operator is not one `export` writes, and is
    refused before ONNX Runtime parses it. The genuine model passes."""
    import onnx
    from onnx import TensorProto, helper

    from manifpt_cli.attribute import OnnxAttributor

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"])],
        "body",
        [
            helper.make_tensor_value_info(name, TensorProto.INT64 if name == "i" else TensorProto.BOOL, [])
            for name in ("i", "cond")
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])],
    )
    edits = {
        "loop": lambda proto: proto.graph.node.append(helper.make_node("Loop", ["", ""], [], body=body)),
        "function": lambda proto: proto.functions.append(
            helper.make_function("local", "f", ["x"], ["y"], [helper.make_node("Relu", ["x"], ["y"])], [])
        ),
        "custom": lambda proto: proto.graph.node.append(helper.make_node("Foo", [], ["foo"], domain="com.example")),
    }
    messages = {
        "loop": "a subgraph \\(in a Loop node\\)",
        "function": "model-local functions",
        "custom": "custom domain",
    }
    for name, edit in edits.items():
        proto = onnx.load(str(case["model"]))
        edit(proto)
        {p.key: p for p in proto.metadata_props}["manifpt_digest"].value = ONNX_DIGEST_PLACEHOLDER
        onnx.save(proto, str(tmp_path / f"{name}.onnx"))
        seal_onnx(tmp_path / f"{name}.onnx")
        with pytest.raises(IntegrityError, match=messages[name]):
            OnnxAttributor(tmp_path / f"{name}.onnx")
    # A graph field sent as a number (wire type 0), not a message: one clear line, not a traceback.
    proto = onnx.load(str(case["model"]))
    {p.key: p for p in proto.metadata_props}["manifpt_digest"].value = ONNX_DIGEST_PLACEHOLDER
    (tmp_path / "wire.onnx").write_bytes(proto.SerializeToString() + bytes([7 << 3, 1]))
    seal_onnx(tmp_path / "wire.onnx")
    with pytest.raises(FormatError, match="not a readable ONNX model: a message or string field of another wire type"):
        OnnxAttributor(tmp_path / "wire.onnx")
    OnnxAttributor(case["model"])


def test_a_sealed_model_whose_output_shape_depends_on_its_input_stops_the_run(case, tmp_path):
    """Its declared shapes pass the load-time check; at run time it gives one column of
    probabilities, which would silently become wrong rows: refused, and no report is left."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(case["model"]))
    graph = proto.graph
    for node in graph.node:
        node.output[:] = ["sliced_from" if name == "probabilities" else name for name in node.output]
    constants = {"zero": 0, "one": 1, "axis": 1}
    graph.initializer.extend(numpy_helper.from_array(np.array([v], np.int64), name) for name, v in constants.items())
    graph.initializer.append(numpy_helper.from_array(np.array(1e30, np.float32), "huge"))
    graph.node.extend(
        [
            helper.make_node("ReduceSum", ["artifact"], ["total"], keepdims=0),
            helper.make_node("Greater", ["total", "huge"], ["never"]),
            helper.make_node("Cast", ["never"], ["never_int"], to=onnx.TensorProto.INT64),
            helper.make_node("Add", ["never_int", "one"], ["end"]),  # 1: the first column only
            helper.make_node("Slice", ["sliced_from", "zero", "end", "axis"], ["probabilities"]),
        ]
    )
    {p.key: p for p in proto.metadata_props}["manifpt_digest"].value = ONNX_DIGEST_PLACEHOLDER
    onnx.save(proto, str(tmp_path / "sliced.onnx"))
    seal_onnx(tmp_path / "sliced.onnx")
    out = tmp_path / "r.csv"
    result = cli(
        "attribute",
        case["suspects"],
        "--model",
        tmp_path / "sliced.onnx",
        "--index",
        case["index"],
        "--report",
        "csv",
        "--out",
        out,
        code=EXIT_FAILURE,
    )
    assert "gave probabilities of shape" in result.stderr and not out.exists()


def test_rows_do_not_depend_on_batch_size_workers_or_threads(case, tmp_path):
    reports, batch_sizes = [], []
    runs = [("--batch-size", 1, "--threads", 1), ("--batch-size", 7, "--workers", 2, "--threads", 2)]
    runs += [("--batch-size", 64, "--workers", 3, "--threads", 1), ()]  # the last: the default batch size
    for i, options in enumerate(runs):
        out = tmp_path / f"r{i}.csv"
        attribute_csv(case, out, *options)
        reports.append(out.read_bytes())
        batch_sizes.append(json.loads(Path(f"{out}.meta.json").read_text())["settings"]["batch_size"])
    assert reports[0] == reports[1] == reports[2] == reports[3]
    assert batch_sizes == [1, 7, 64, SMALL_IMAGE_BATCH_SIZE]  # freq at 32 px: no backbone, small images


def test_verify_says_what_still_matches(case, tmp_path):
    suspects = tmp_path / "suspects"
    shutil.copytree(case["suspects"], suspects)
    out = tmp_path / "r.csv"
    cli("attribute", suspects, "--model", case["model"], "--index", case["index"], "--report", "csv", "--out", out)
    cli("verify", out)
    changed = next((suspects / "noise").iterdir())
    changed.write_bytes(changed.read_bytes() + b"\0")
    result = cli("verify", out, code=EXIT_FAILURE)
    assert changed.name in result.stdout and "1 changed" in result.stderr
    rows = out.read_text()
    out.write_text(rows.replace("noise", "blur", 1))
    assert "report" in cli("verify", out, code=EXIT_FAILURE).stdout
    Path(f"{out}.meta.json").unlink()  # a CSV copied without its provenance cannot be checked: 1, not 2
    assert "r.csv.meta.json is missing" in cli("verify", out, code=EXIT_FAILURE).stderr


def documented_digest(document: dict) -> str:
    """A report's content_sha256 as the README defines it, written out here again: SHA-256 of the
    compact, key-sorted UTF-8 JSON of a JSON report's header, rows and finished_utc (in that
    order), or of a CSV's sidecar without the digest itself."""
    import hashlib

    def canonical(value) -> str:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    if "rows" in document:
        header, finished = canonical(document["header"]), canonical(document["finished_utc"])
        rows = ",".join(canonical(row) for row in document["rows"])
        text = f'{{"header":{header},"rows":[{rows}],"finished_utc":{finished}}}'
    else:
        text = canonical({key: value for key, value in document.items() if key != "content_sha256"})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_an_edit_anywhere_in_a_report_is_found_and_never_rendered(case, tmp_path, fmt):
    """The whole report is covered: a JSON report's rows and header, and a CSV's sidecar header
    (operator, times, settings), by content_sha256; `verify` says so and `manifpt report` refuses
    it. A report without the digest (removed, or from before reports carried one) cannot be told
    from an edited one: `verify` says it could not be checked, and `manifpt report` refuses it."""
    out = tmp_path / f"r.{fmt}"
    inputs = ["--model", case["model"], "--index", case["index"]]
    result = cli("attribute", case["suspects"], *inputs, "--report", fmt, "--out", out)
    holder = out if fmt == "json" else Path(f"{out}.meta.json")
    document = json.loads(holder.read_text(encoding="utf-8"))
    assert document["content_sha256"] == documented_digest(document)
    assert f"content_sha256 {document['content_sha256']}" in " ".join(result.stderr.split())
    assert "0 changed" in cli("verify", out).stderr
    edits = {"operator": lambda d: d.get("header", d)["operator"].update(name="someone else")}
    if fmt == "json":
        edits["verdict"] = lambda d: d["rows"][0].update(verdict="real")
        edits["finished"] = lambda d: d.update(finished_utc="2020-01-01T00:00:00Z")
    else:
        edits["settings"] = lambda d: d["settings"].update(threads=99)
    for name, edit in edits.items():
        forged = json.loads(json.dumps(document))
        edit(forged)
        holder.write_text(json.dumps(forged, indent=1), encoding="utf-8")
        verified = cli("verify", out, code=EXIT_FAILURE)
        assert "1 changed" in verified.stderr and holder.name in verified.stdout, name
        rendered = cli("report", out, "--html", tmp_path / "forged.html", code=EXIT_FAILURE)
        assert "changed after manifpt wrote it" in rendered.stderr and not (tmp_path / "forged.html").exists()
    # Reformatted, not changed: the digest is over the content, not the bytes.
    holder.write_text(json.dumps(document, indent=4, ensure_ascii=True), encoding="utf-8")
    assert "0 changed" in cli("verify", out).stderr
    old = {key: value for key, value in document.items() if key != "content_sha256"}
    holder.write_text(json.dumps(old), encoding="utf-8")
    verified = cli("verify", out, code=EXIT_FAILURE)
    assert "no content_sha256" in verified.stdout and "0 changed" in verified.stderr
    rendered = cli("report", out, "--html", tmp_path / "old.html", code=EXIT_FAILURE)
    assert "has no digest to check it against" in rendered.stderr and not (tmp_path / "old.html").exists()


def test_verify_never_waits_on_a_fifo_or_a_device_and_refuses_malformed_reports(case, tmp_path):
    """A report naming a FIFO or /dev/zero as a suspect or the model is checked at once (those are
    not checked, not read); a report, or its sidecar, that is a FIFO is refused; and a report whose
    JSON is not shaped as manifpt writes it is one clear error, not a traceback."""
    out = tmp_path / "r.json"
    cli(
        "attribute",
        case["suspects"],
        "--model",
        case["model"],
        "--index",
        case["index"],
        "--report",
        "json",
        "--out",
        out,
    )
    report = json.loads(out.read_text())
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    named = json.loads(json.dumps(report))
    named["rows"][0]["path"], named["rows"][1]["path"] = str(fifo), "/dev/zero"
    named["header"]["model"] = str(fifo)
    (tmp_path / "named.json").write_text(json.dumps(named))
    # A regression would wait on the FIFO (or read /dev/zero) for ever: each run has a time limit.
    result = finishes(lambda: cli("verify", tmp_path / "named.json", code=EXIT_FAILURE), writer_for(fifo), 60)
    assert result.stdout.count("not a regular file") == 3
    (tmp_path / "fifo.json").symlink_to(fifo)
    result = finishes(lambda: cli("verify", tmp_path / "fifo.json", code=EXIT_USAGE), writer_for(fifo))
    assert "not a regular file" in result.stderr
    (tmp_path / "r.csv").write_text("path,sha256\r\n")  # its sidecar is what is wrong here
    os.mkfifo(tmp_path / "r.csv.meta.json")
    sidecar = writer_for(tmp_path / "r.csv.meta.json")
    assert "not a regular file" in finishes(lambda: cli("verify", tmp_path / "r.csv", code=EXIT_USAGE), sidecar).stderr
    malformed = {
        "list": [report],
        "header-list": {**report, "header": []},
        "row-number": {**report, "rows": [1]},
        "path-number": {**report, "rows": [{**report["rows"][0], "path": 7}]},
        "classes-text": {**report, "header": {**report["header"], "classes": "abc"}},
        "rule-list": {**report, "header": {**report["header"], "verdict_rule": [1]}},
        "distance-list": {**report, "rows": [{**report["rows"][0], "manifold_distance": [1]}]},
        "top-k-text": {**report, "rows": [{**report["rows"][0], "top_k": [{"label": "a", "probability": "0.5"}]}]},
    }
    for name, content in malformed.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    for name in [*malformed, "deep"]:
        for command in (["verify"], ["report", "--html", tmp_path / "x.html"]):
            result = cli(*command, tmp_path / f"{name}.json", code=EXIT_FAILURE)
            assert "is not a manifpt report" in result.stderr, (name, command)


# --- 3. report and provenance always agree -------------------------------------------------------


def _old_pair(out: Path) -> tuple[bytes, bytes]:
    out.write_bytes(b"old report")
    Path(f"{out}.meta.json").write_bytes(b"old provenance")
    return b"old report", b"old provenance"


@pytest.mark.parametrize(
    "fault, after",
    [(OSError(5, "Input/output error"), False), (KeyboardInterrupt(), False), (KeyboardInterrupt(), True)],
    ids=["EIO-second-rename", "SIGINT-second-rename", "SIGINT-just-after-first-rename"],
)
def test_a_failure_between_the_two_renames_keeps_both_old_files(case, tmp_path, monkeypatch, fault, after):
    out = tmp_path / "r.csv"
    old = _old_pair(out)
    real_replace, calls = os.replace, []

    def replace_failing_third(src, dst):  # fails once; the roll-back's own renames go through
        calls.append(dst)
        if after and len(calls) == 2:  # Ctrl-C lands as the report's rename returns
            real_replace(src, dst)
            raise fault
        if not after and len(calls) == 3:  # 1: the commit journal, 2: the report, 3: its provenance
            raise fault
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace_failing_third)
    with pytest.raises((type(fault), outputs.OutputWriteError)):
        run_attribution(
            case["model"],
            case["index"],
            [case["suspects"]],
            reports=[ReportTarget(ReportFormat.CSV, out)],
            overwrite=True,
        )
    assert (out.read_bytes(), Path(f"{out}.meta.json").read_bytes()) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.csv.meta.json"], "no partial, backup or journal"


KILL_ON_SECOND_RENAME = """
import os, signal, sys
from manifpt_cli import outputs
from manifpt_cli.cli import main
real, calls = os.replace, []
def replace(src, dst):
    calls.append(dst)
    if len(calls) == 3:  # 1: the commit journal, 2: the report, 3: its provenance
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
outputs.os.replace = replace
sys.argv = ["manifpt", *sys.argv[1:]]
main()
"""


def test_a_kill_between_the_renames_is_rolled_back_by_the_next_run(case, tmp_path):
    out = tmp_path / "r.csv"
    old = _old_pair(out)
    args = attribute_args(case, out, "--overwrite")
    killed = subprocess.run([sys.executable, "-c", KILL_ON_SECOND_RENAME, *map(str, args)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert out.read_bytes() != old[0], "the first rename happened: the pair is inconsistent until recovery"
    with outputs.atomic_outputs([out, f"{out}.meta.json"], overwrite=True) as partials:
        # The next writer takes the lock, finds the journal and restores the old pair first.
        assert (out.read_bytes(), Path(f"{out}.meta.json").read_bytes()) == old
        for partial in partials:
            partial.write_bytes(b"new")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_concurrent_writer_is_refused_and_stale_partials_are_removed(case, tmp_path):
    out = tmp_path / "r.csv"
    lock = outputs._Lock(out)
    lock.acquire()
    try:
        result = attribute_csv(case, out, code=EXIT_USAGE)
        assert "another manifpt run is writing" in result.stderr
    finally:
        lock.release()
    stale = tmp_path / ".r.csv.partial-0123456789abcdef"
    stale.write_bytes(b"\0" * 1000)
    attribute_csv(case, out)
    assert not stale.exists()
    sidecar = json.loads(Path(f"{out}.meta.json").read_text())
    assert sidecar["report_sha256"] == __import__("hashlib").sha256(out.read_bytes()).hexdigest()


def test_stdout_carries_exactly_the_report_even_on_a_terminal(case, tmp_path):
    import pty

    primary, secondary = pty.openpty()  # stderr is a terminal: the progress bar is drawn there
    with open(tmp_path / "out.csv", "wb") as stdout:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "manifpt_cli",
                "attribute",
                str(case["suspects"]),
                "--model",
                str(case["model"]),
                "--index",
                str(case["index"]),
                "--report",
                "csv",
            ],
            stdout=stdout,
            stderr=secondary,
            timeout=120,
        )
    os.close(secondary)
    os.close(primary)
    assert done.returncode == 0
    with open(tmp_path / "out.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(1 for p in case["suspects"].rglob("*") if p.is_file())
    assert all(row["status"] == "ok" for row in rows)


def linked_copies(source: Path, folder: Path, copies: int) -> Path:
    """``copies`` hard links of every file under ``source``: enough work for a signal to land mid-run."""
    folder.mkdir()
    for copy in range(copies):
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            os.link(path, folder / f"{copy}_{path.parent.name}_{path.name}")
    return folder


def test_interrupted_json_on_stdout_is_unterminated_and_said_so(case, tmp_path):
    many = linked_copies(case["suspects"], tmp_path / "many", 20)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "manifpt_cli",
            "attribute",
            str(many),
            "--model",
            str(case["model"]),
            "--index",
            str(case["index"]),
            "--report",
            "json",
            "--batch-size",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = process.stdout.read(200)  # the header and the first rows are out: the run is under way
    process.send_signal(signal.SIGINT)
    rest, errors = process.communicate(timeout=120)
    text = (first + rest).decode()
    assert process.returncode == 130, errors.decode()
    assert "incomplete" in errors.decode()
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


# --- 5. reports that cannot be misread -----------------------------------------------------------

HOSTILE_NAMES = [
    b"line\rbreak.png",
    b"new\nline.png",
    b'quo"te.png',
    b"com,ma.png",
    b"tab\tname.png",
    b"\xff\xfe.png",
    b"\\xff.png",
    b"=cmd.png",
    b"+sum.png",
    b"-minus.png",
    b"@at.png",
    b"'quoted.png",
    b"IMG_[edited].png",
    b"bold]y.png",
    b"<script>.png",
]


def test_hostile_file_names_round_trip_through_csv_and_json(case, tmp_path):
    folder = tmp_path / "hostile"
    folder.mkdir()
    source = next((case["suspects"] / "blur").iterdir()).read_bytes()
    for name in HOSTILE_NAMES:
        # "bold]y.png" goes in a folder "x[", so its path reads x[/bold]y.png: a Rich closing tag.
        parent = os.path.join(os.fsencode(folder), b"x[") if name == b"bold]y.png" else os.fsencode(folder)
        os.makedirs(parent, exist_ok=True)
        with open(os.path.join(parent, name), "wb") as handle:
            handle.write(source)
    base = ("attribute", folder, "--model", case["model"], "--index", case["index"])
    cli(*base, "--report", "csv", "--out", tmp_path / "r.csv")
    with open(tmp_path / "r.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(HOSTILE_NAMES), "one record per file"
    names = sorted(os.path.basename(path_from_display(unneutralise(row["path"]))) for row in rows)
    assert names == sorted(HOSTILE_NAMES)
    for row in rows:
        assert not row["path"].startswith(("=", "+", "-", "@")), "formula cells are neutralised"
    shown = [row["path"] for row in rows]
    assert len(set(shown)) == len(shown), "two files never share a path string"

    report = json.loads(cli(*base, "--report", "json").stdout)
    assert sorted(os.path.basename(path_from_display(r["path"])) for r in report["rows"]) == sorted(HOSTILE_NAMES)

    table = cli(*base).stdout
    assert "IMG_[edited].png" in table and "x[/bold]y.png" in table and "<script>.png" in table
    assert "\\r" in table and "\r" not in table.replace("\r\n", ""), "control characters are shown, not obeyed"


def test_output_paths_that_are_not_utf8_are_written_and_shown_as_reports_show_paths(case, dataset, tmp_path):
    """A report, its sidecar, an artifacts file and an ONNX model under a name with a byte that is
    not UTF-8: each used to fail with a traceback once the work was done."""
    from manifpt_cli.artifacts import artifacts_index_path

    odd = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"odd\xff"))
    os.mkdir(odd)
    report = os.path.join(odd, "r\udcff.csv")
    result = attribute_csv(case, report, "--html", os.path.join(odd, "case.html"))
    assert "odd\\xff/r\\xff.csv" in result.stderr and "\udcff" not in result.stderr
    assert "0 changed" in cli("verify", report).stderr
    index = shutil.copy(case["index"], os.path.join(odd, "real.h5"))
    artifacts = os.path.join(odd, "a.h5")
    cli("extract", "--index", index, "--source", f"a={dataset / 'train' / 'blur'}", "--out", artifacts)
    assert artifacts_index_path(artifacts) == os.path.abspath(index)
    cli("export", case["work"] / "freq.pt", "--out", os.path.join(odd, "m.onnx"))
    assert sorted(os.listdir(odd)) == sorted(
        ["r\udcff.csv", "r\udcff.csv.meta.json", "case.html", "real.h5", "a.h5", "m.onnx"]
    )


def test_ranks_follow_the_logits_where_float32_probabilities_underflow(case, tmp_path):
    """At a sharp temperature every probability but the first is 0.0 in float32; the runner-up
    and the rest of top-k used to follow class order then, not the model."""
    import onnxruntime as ort

    from manifpt_cli.attribute import Attribution
    from manifpt_cli.formats import CHECKPOINT_FORMAT, load_checkpoint_payload, save_checkpoint
    from manifpt_cli.images import decode_folder
    from manifpt_cli.settings import RunSettings

    state, metadata = load_checkpoint_payload(case["work"] / "freq.pt", CHECKPOINT_FORMAT)
    state["temperature"] = state["temperature"] * 0 + 1e-4
    save_checkpoint(tmp_path / "sharp.pt", state, metadata)
    export_onnx(tmp_path / "sharp.pt", tmp_path / "sharp.onnx")
    session = ort.InferenceSession(str(tmp_path / "sharp.onnx"))
    underflowed = 0
    with Attribution(tmp_path / "sharp.onnx", case["index"], top_k=3) as run:
        for batch in decode_folder([case["suspects"]], run.model.image_size, RunSettings()):
            searched = run.predicted(run.search_batch(batch))
            (logits,) = session.run(["logits"], {"artifact": searched.inputs})
            for row, row_logits in zip(run.finish_batch(searched), logits):
                expected = [run.model.classes[j] for j in np.argsort(-row_logits, kind="stable")[:3]]
                assert [label for label, _ in row.top_k] == expected
                underflowed += row.top_k[1][1] == 0.0
    assert underflowed > 0, "the case must have rows whose runner-up underflows"


def test_a_model_that_gives_nan_yields_error_rows_and_valid_json(case, artifacts_file, tmp_path):
    import torch

    from manifpt_cli.formats import save_checkpoint
    from manifpt_cli.train import load_checkpoint

    model, metadata = load_checkpoint(case["work"] / "freq.pt")
    state = model.state_dict()
    state["attributor.head.bias"] = torch.full_like(state["attributor.head.bias"], float("nan"))
    save_checkpoint(tmp_path / "nan.pt", state, metadata)
    export_onnx(tmp_path / "nan.pt", tmp_path / "nan.onnx")
    result = cli(
        "attribute",
        case["suspects"] / "blur",
        "--model",
        tmp_path / "nan.onnx",
        "--index",
        case["index"],
        "--report",
        "json",
        code=3,
    )
    report = json.loads(result.stdout)  # strict JSON: no NaN literals
    assert report["rows"] and all(row["status"] == "error" and "non-finite" in row["error"] for row in report["rows"])


# --- 6. failures that explain themselves ---------------------------------------------------------


def test_wrong_files_get_one_clear_line(case, tmp_path):
    (tmp_path / "text.h5").write_text("not hdf5")
    (tmp_path / "truncated.h5").write_bytes(Path(case["index"]).read_bytes()[:5000])
    fifo = tmp_path / "fifo.onnx"
    os.mkfifo(fifo)
    cases = [
        (
            ("attribute", case["suspects"], "--model", case["model"], "--index", tmp_path / "missing.h5"),
            2,
            "no such index",
        ),
        (
            ("attribute", case["suspects"], "--model", case["model"], "--index", tmp_path / "text.h5"),
            1,
            "not a readable",
        ),
        (
            ("attribute", case["suspects"], "--model", case["model"], "--index", tmp_path / "truncated.h5"),
            1,
            "not a readable",
        ),
        (
            ("attribute", case["suspects"], "--model", case["work"] / "freq.pt", "--index", case["index"]),
            2,
            "not an ONNX model",
        ),
        (("export", case["model"], "--out", tmp_path / "x.onnx"), 2, "already an ONNX model"),
        (("export", case["index"], "--out", tmp_path / "y.onnx"), 2, "an HDF5 file"),
        # Files of the wrong kind, manifpt's own or not: a usage error (2), as the README says
        (("attribute", case["suspects"], "--model", case["model"], "--index", case["model"]), 2, "not a manifpt index"),
        (("index", "info", case["work"] / "freq.pt"), 2, "a zip archive"),
        (
            ("train", "--artifacts", case["index"], "--space", "freq", "--out", tmp_path / "t.pt"),
            2,
            "is a manifpt-real-index file, not a manifpt-artifacts file",
        ),
        # Said as what they are, never opened (a FIFO would block)
        (
            ("attribute", case["suspects"], "--model", fifo, "--index", case["index"]),
            2,
            "is a FIFO (named pipe), not a model file",
        ),
        (
            ("attribute", case["suspects"], "--model", case["model"], "--index", tmp_path),
            2,
            "is a folder, not an index file",
        ),
        (("export", "/dev/null", "--out", tmp_path / "z.onnx"), 2, "is a device, not a checkpoint file"),
        (("train", "--artifacts", fifo, "--space", "freq", "--out", tmp_path / "m.pt"), 2, "not an artifacts file"),
    ]
    for args, code, words in cases:
        result = cli(*args, code=code)
        assert words in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert "weights_only" not in result.stderr and "INVALID_PROTOBUF" not in result.stderr


def test_a_full_disk_is_a_clear_error_and_leaves_nothing(case, dataset, tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)]).returncode:
        pytest.skip("needs root and tmpfs to make a tiny filesystem")
    try:
        result = cli("index", "build", dataset / "real", "--out", mount / "real.h5", "-q", code=EXIT_FAILURE)
        assert "no space left" in result.stderr
        subprocess.run(["mount", "-o", "remount,size=8k", str(mount)], check=True)  # smaller than the report
        result = attribute_csv(case, mount / "report.csv", code=EXIT_FAILURE)
        assert "no space left" in result.stderr
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)])


@pytest.mark.parametrize("command", ["index build", "extract"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_build_or_extract_leaves_nothing_and_exits_130(dataset, real_index, tmp_path, command, sig):
    many = linked_copies(dataset / "real", tmp_path / "many", 256)  # long enough that the signal lands mid-run
    out = tmp_path / "out.h5"
    if command == "index build":
        args = ["index", "build", str(many), "--space", "rgb,freq"]
    else:
        args = ["extract", "--index", str(real_index), "--source", f"a={many}"]
    process = subprocess.Popen(
        [sys.executable, "-m", "manifpt_cli", *args, "--out", str(out), "--batch-size", "1"], stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.h5.partial-*")) and time.monotonic() < deadline:
        time.sleep(0.02)  # wait until the partial file is being written
    process.send_signal(sig)
    _, errors = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the build finished before the signal")
    assert process.returncode == 130, errors.decode()
    assert [p.name for p in tmp_path.iterdir()] == ["many"], "nothing under the final name, no partial file"


INTERRUPT_INSIDE_A_C_EXTENSION = """
import os, signal, time
import typer
from manifpt_cli.cli.console import Interrupts, errors_to_exit

def command():
    with errors_to_exit():
        try:
            os.kill(os.getpid(), signal.{sig})
            time.sleep(30)
        except KeyboardInterrupt:
            # What h5py's Cython converters make of an exception raised inside them (CI saw exactly this).
            raise TypeError("Operation not defined for data type class")

Interrupts.install()
typer.run(command)
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_an_interrupt_that_a_library_turns_into_its_own_error_still_exits_130(sig):
    script = INTERRUPT_INSIDE_A_C_EXTENSION.format(sig=sig)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    assert "interrupted: no partial output was kept" in done.stderr and "TypeError" not in done.stderr
    not_interrupted = script.replace(f"os.kill(os.getpid(), signal.{sig})", "raise KeyboardInterrupt")
    not_interrupted = not_interrupted.replace("Interrupts.install()", "")
    plain = subprocess.run([sys.executable, "-c", not_interrupted], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 1 and "TypeError" in plain.stderr, "a library's error without a signal stays itself"


def test_a_commands_own_exit_and_a_later_commands_error_are_not_taken_for_an_interrupt(monkeypatch):
    import typer

    from manifpt_cli.cli.console import Interrupts, errors_to_exit

    def run(exc: BaseException) -> BaseException:
        try:
            with errors_to_exit():
                Interrupts.received = signal.SIGTERM  # a signal that lands in this command
                raise exc
        except BaseException as raised:
            return raised

    monkeypatch.setattr(Interrupts, "received", None)
    assert run(typer.Exit(3)).exit_code == 3, "a partial result's exit code stays its own"
    assert run(TypeError("in h5py")).exit_code == 130
    monkeypatch.setattr(Interrupts, "received", signal.SIGTERM)  # from an earlier command
    with pytest.raises(ValueError), errors_to_exit():
        raise ValueError("a later command's own error")


def test_research_results_are_not_overwritten_either(artifacts_file, tmp_path):
    (tmp_path / "metrics.json").write_text("an earlier evaluation")
    started = time.perf_counter()
    result = cli("evaluate", "--artifacts", artifacts_file, "--space", "freq", "--out", tmp_path, code=EXIT_USAGE)
    assert "already exists; pass --overwrite" in result.stderr and time.perf_counter() - started < 10, (
        "refused up front"
    )
    assert (tmp_path / "metrics.json").read_text() == "an earlier evaluation"


@pytest.mark.parametrize("field", ["classes", "calibration", "verdict_rule"])
def test_verify_checks_the_report_header_against_the_model(case, tmp_path, field):
    """A header whose classes, calibration or verdict rule were edited (a swapped label reads as
    another verdict), and then sealed again with a fresh content_sha256, is still caught: against
    the verified model's own card."""
    out = tmp_path / "r.csv"
    attribute_csv(case, out)
    assert "report header" in cli("verify", out, "--all").stdout
    sidecar = Path(f"{out}.meta.json")
    header = json.loads(sidecar.read_text())
    if field == "classes":
        header["classes"] = header["classes"][::-1]
    elif field == "calibration":
        header["calibration"] = {"method": "none"}
    else:
        header["verdict_rule"] = {**header["verdict_rule"], "threshold": 0.01}
    header["content_sha256"] = documented_digest(header)
    sidecar.write_text(json.dumps(header))
    result = cli("verify", out, code=EXIT_FAILURE)
    listed = " ".join(result.stdout.split())  # the table may wrap the detail
    assert "report header" in listed and field in listed and "1 changed" in result.stderr
