"""Verdicts: calibration and open-set metrics against their definitions, the verdict rule, notes,
perturbations, a real class from the index, enrolment, and real photos outside the index."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from manifpt_cli.artifacts import REAL_FROM_INDEX, extract_artifacts, load_artifacts
from manifpt_cli.casework import run_attribution
from manifpt_cli.errors import FormatError, UsageError
from manifpt_cli.export import export_onnx
from manifpt_cli.formats import CHECKPOINT_FORMAT, load_checkpoint_payload, save_checkpoint
from manifpt_cli.images import decode_image
from manifpt_cli.openset import (
    SCORES,
    auroc,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    known_threshold,
    oscr,
    softmax,
    temperature_at_bound,
    threshold_at,
    tnr_at_tpr,
)
from manifpt_cli.perturb import parse_perturbations
from manifpt_cli.spaces import Space
from manifpt_cli.train import TrainConfig, train_attributor
from manifpt_cli.verdicts import INCONCLUSIVE, UNKNOWN, VerdictRule

from .conftest import SIZE, SOURCES, photo_crops, write_crops

# --- metrics against their definitions ---------------------------------------------------------


def test_auroc_is_the_share_of_correctly_ordered_pairs():
    rng = np.random.default_rng(0)
    known, unknown = rng.normal(1, 1, 40).round(1), rng.normal(0, 1, 30).round(1)  # rounded: ties happen
    pairs = [(k > u) + 0.5 * (k == u) for k in known for u in unknown]
    assert auroc(known, unknown) == pytest.approx(np.mean(pairs))
    assert auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0


def test_threshold_and_tnr_at_tpr():
    known = np.arange(100, dtype=float)  # 0..99
    threshold = threshold_at(known, 0.05)
    assert (known < threshold).mean() <= 0.05 and (known <= threshold).mean() > 0.05
    unknown = np.array([1.0, 2.0, 50.0, 60.0])
    assert tnr_at_tpr(known, unknown, 0.95) == 0.5  # the threshold accepts 95 % of knowns: 5.0


def test_the_known_threshold_holds_its_false_alarm_rate_for_new_images():
    """Scores uniform on [0, 1]: a new known image falls below a threshold t with probability t,
    so the mean threshold over many validation draws is the rate the model states for new images."""
    rng = np.random.default_rng(0)
    draws = rng.random((4000, 40))
    conformal = np.mean([known_threshold(scores, 0.05)[0] for scores in draws])
    plain = np.mean([threshold_at(scores, 0.05) for scores in draws])
    assert conformal == pytest.approx(2 / 41, abs=0.002) and known_threshold(draws[0], 0.05)[1] == 2 / 41
    assert plain == pytest.approx(3 / 41, abs=0.002), "the plain quantile: 7.3 % on new images"
    assert known_threshold(np.arange(19.0), 0.05) == (0.0, 1 / 20)  # 19 images: the lowest, 1/20 on new ones
    assert known_threshold(np.arange(9.0), 0.05) == (0.0, 1 / 10), "too few: the rate stated is what it gives"


def test_oscr_of_perfect_and_of_useless_scores():
    known, unknown = np.array([5.0, 6.0, 7.0, 8.0]), np.array([1.0, 2.0])
    all_correct = np.ones(4, bool)
    assert oscr(known, all_correct, unknown) == pytest.approx(1.0)
    half_correct = np.array([True, False, True, False])
    assert oscr(known, half_correct, unknown) == pytest.approx(0.5)
    assert oscr(unknown.repeat(2), all_correct, known[:2]) == pytest.approx(0.0), "every unknown outranks the knowns"
    tied = np.ones(4)
    assert oscr(tied, all_correct, tied[:2]) == pytest.approx(0.5), "one score for all: chance, not 1"


def test_ece_and_brier_on_hand_computed_cases():
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = np.array([0, 1, 0, 0])
    # bins: 0.9 holds two (accuracy 0.5), 0.6 holds two (accuracy 1.0)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    expected = np.mean([0.01 + 0.01, 0.81 + 0.81, 0.16 + 0.16, 0.16 + 0.16])
    assert brier_score(probabilities, labels) == pytest.approx(expected)


def test_temperature_fit_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 4, (4000, 5))
    true_temperature = 2.5
    labels = np.array([rng.choice(5, p=p) for p in softmax(logits, true_temperature)])
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.1)
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits, fitted), labels)
    assert after < before / 3
    assert not temperature_at_bound(fitted)
    # A split the network separates perfectly cannot fix T: it runs to the range's end, and says so.
    separated = fit_temperature(logits, logits.argmax(axis=1))
    assert separated == pytest.approx(0.05, rel=0.01) and temperature_at_bound(separated)


# --- notes, the verdict rule, perturbations ----------------------------------------------------


@pytest.mark.parametrize("quality", [20, 50, 75, 90, 97])
def test_jpeg_quality_is_read_from_the_quantisation_tables(tmp_path, quality):
    image = np.random.default_rng(quality).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "x.jpg", quality=quality)
    Image.fromarray(image).save(tmp_path / "x.png")
    assert decode_image(str(tmp_path / "x.jpg"), 32).jpeg_quality == quality
    assert decode_image(str(tmp_path / "x.png"), 32).jpeg_quality is None


def card(**training) -> dict:
    return {
        "image_size": 32,
        "has_real_class": True,
        "open_set": {"score": "msp", "threshold": 0.6, "target_fpr": 0.05, "graph_scores": list(SCORES[:4])},
        "manifold_reference": {"distance": 100.0},
        "training": training,
    }


def test_the_verdict_rule_in_order():
    rule = VerdictRule(card())
    clean = rule.notes((32, 32), None, 10.0)
    assert clean == []
    assert rule.decide("gan", 0.9, clean) == "gan"
    assert rule.decide("real", 0.9, clean) == "real"
    assert rule.decide("gan", 0.5, clean) == UNKNOWN
    assert rule.decide("gan", float("nan"), clean) == UNKNOWN
    for notes in (rule.notes((64, 64), None, 10.0), rule.notes((32, 32), 90, 10.0), rule.notes((32, 32), None, 101.0)):
        assert len(notes) == 1 and notes[0].weakens
        assert rule.decide("gan", 0.9, notes) == INCONCLUSIVE
        assert rule.decide("gan", 0.1, notes) == INCONCLUSIVE, "weakened evidence cannot say unknown either"
    assert rule.score_of([0.7, 1.0, -3.0, -0.2], 5.0) == 0.7


def test_training_augmentation_covers_what_it_trained_for():
    rule = VerdictRule(card(augment=["jpeg:75", "resize:0.5"]))
    assert not any(n.weakens for n in rule.notes((64, 64), 80, 10.0)), "resampling and q80 ≥ q75 were trained"
    assert [n.code for n in rule.notes((32, 32), 60, 10.0) if n.weakens] == ["jpeg"], "q60 is harsher than q75"


def test_perturbations_parse_and_keep_the_image_size():
    perturbations = parse_perturbations("jpeg:90, resize:0.5,blur:1.0,crop:0.9")
    assert [p.name for p in perturbations] == ["jpeg:90", "resize:0.5", "blur:1", "crop:0.9"]
    image = photo_crops(1, seed=3)[0]
    for perturbation in perturbations:
        changed = perturbation.apply(image)
        assert changed.shape == image.shape and changed.dtype == np.uint8
        assert not np.array_equal(changed, image), perturbation.name
    for bad in ("jpeg:0", "jpeg:90.5", "resize:1", "crop:1.2", "blur:-1", "sharpen:2", "jpeg", ""):
        with pytest.raises(UsageError):
            parse_perturbations(bad)


# --- the whole path on real images -------------------------------------------------------------


@pytest.fixture(scope="module")
def verdict_model(real_index, dataset, tmp_path_factory) -> dict:
    """freq artifacts with a real class drawn from the index, a trained and exported model."""
    work = tmp_path_factory.mktemp("verdicts")
    sources = [(name, str(dataset / "train" / name)) for name in SOURCES]
    extract_artifacts(real_index, sources, work / "art.h5", real=REAL_FROM_INDEX)
    config = TrainConfig(epochs=20, open_set_score="auto")
    result = train_attributor(work / "art.h5", Space.FREQ, work / "m.pt", config=config)
    export_onnx(work / "m.pt", work / "m.onnx")
    return {"work": work, "artifacts": work / "art.h5", "result": result, "model": work / "m.onnx"}


def attribute_rows(model: Path, index: Path, folder: Path) -> list:
    rows = []
    run_attribution(model, index, [folder], on_row=rows.append)
    return rows


def test_real_class_from_the_index_is_leave_one_out(verdict_model, real_index):
    data = load_artifacts(verdict_model["artifacts"], Space.FREQ)
    real = data.samples.labels == data.samples.label_names.index("real")
    largest = max(np.bincount(data.samples.labels[~real]))
    assert real.sum() == largest, "as many real images as the largest source"
    assert (data.distances[real] > 0).all(), "no real image is its own neighbour"


def test_model_card_holds_calibration_and_the_chosen_score(verdict_model):
    metadata = verdict_model["result"].metadata
    selection = metadata["open_set"]["selection"]
    assert selection["chosen"] == metadata["open_set"]["score"] in SCORES
    assert max(selection["mean_auroc"].values()) == selection["mean_auroc"][selection["chosen"]]
    assert len(selection["folds"]) == 3 and all(f["held_out"] != "real" for f in selection["folds"])
    calibration = metadata["calibration"]
    assert calibration["temperature"] > 0 and calibration["ece"] <= calibration["ece_before"] + 1e-9
    proto = onnx.load(str(verdict_model["model"]))
    exported = json.loads({p.key: p.value for p in proto.metadata_props}["manifpt"])
    assert exported["open_set"] == metadata["open_set"] and exported["has_real_class"]


def test_reported_probabilities_are_the_calibrated_ones(verdict_model):
    import onnxruntime as ort

    session = ort.InferenceSession(str(verdict_model["model"]), providers=["CPUExecutionProvider"])
    data = load_artifacts(verdict_model["artifacts"], Space.FREQ)
    logits, probabilities = session.run(["logits", "probabilities"], {"artifact": data.artifacts[:16]})
    temperature = verdict_model["result"].metadata["calibration"]["temperature"]
    assert np.allclose(probabilities, softmax(logits, temperature), atol=1e-5)
    assert not np.allclose(probabilities, softmax(logits), atol=1e-3) or abs(temperature - 1) < 0.01


def test_real_photos_outside_the_index_are_real_or_unknown(verdict_model, real_index, tmp_path):
    write_crops(tmp_path / "outside", photo_crops(2, seed=7), "outside")  # new crops, never indexed
    rows = attribute_rows(verdict_model["model"], real_index, tmp_path / "outside")
    verdicts = [row.verdict for row in rows if row.ok]
    assert len(verdicts) >= 20
    share = sum(v in ("real", UNKNOWN) for v in verdicts) / len(verdicts)
    assert share >= 0.9, f"{share:.0%} real or unknown: {verdicts}"


def test_notes_make_resampled_and_jpeg_suspects_inconclusive(verdict_model, real_index, dataset, tmp_path):
    folder = tmp_path / "suspects"
    folder.mkdir()
    original = next((dataset / "suspects" / "blur").iterdir())
    image = Image.open(original)
    image.resize((2 * SIZE, 2 * SIZE), Image.Resampling.BICUBIC).save(folder / "big.png")
    image.save(folder / "recompressed.jpg", quality=85)
    rows = {Path(row.path).name: row for row in attribute_rows(verdict_model["model"], real_index, folder)}
    assert rows["big.png"].verdict == INCONCLUSIVE and rows["big.png"].notes[0].startswith("resampled: 64×64")
    assert rows["recompressed.jpg"].verdict == INCONCLUSIVE
    assert rows["recompressed.jpg"].notes == ["jpeg: JPEG, estimated quality 85"]


def test_csv_rows_carry_verdict_score_and_notes(verdict_model, real_index, dataset, tmp_path):
    out = tmp_path / "report.csv"
    from manifpt_cli.casework import ReportTarget
    from manifpt_cli.report import ReportFormat

    run_attribution(
        verdict_model["model"], real_index, [dataset / "suspects"], reports=[ReportTarget(ReportFormat.CSV, out)]
    )
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    header = json.loads(Path(f"{out}.meta.json").read_text())
    threshold = header["verdict_rule"]["threshold"]
    for row in rows:
        below = float(row["open_set_score"]) < threshold
        assert row["verdict"] == (UNKNOWN if below else row["predicted"]), row  # clean 32×32 PNGs: no notes
    correct = sum(row["verdict"] == Path(row["path"]).parent.name for row in rows)
    assert correct / len(rows) >= 0.6


def test_enrolment_adds_a_source_and_keeps_the_old_ones(verdict_model, real_index, dataset, tmp_path, monkeypatch):
    from manifpt_cli.enroll import enroll

    posterized = [(crop // 64) * 64 + 32 for crop in photo_crops(4, seed=11)]  # a new trace: 4 levels a channel
    write_crops(tmp_path / "new_train", posterized[0::2], "new")
    write_crops(tmp_path / "new_test", posterized[1::2], "new")
    (tmp_path / "new_train" / "broken.png").write_bytes(b"not a png")
    result = enroll(
        verdict_model["work"] / "m.pt", real_index, [("poster", str(tmp_path / "new_train"))], tmp_path / "e.onnx"
    )
    assert [(name, Path(f.path).name) for name, f in result.failures] == [("poster", "broken.png")], "listed, not lost"
    assert result.classes == [*SOURCES, "real", "poster"] and result.counts == {"poster": len(posterized[0::2])}
    card = json.loads({p.key: p.value for p in onnx.load(str(tmp_path / "e.onnx")).metadata_props}["manifpt"])
    assert card["enrolments"][0]["sources"][0]["name"] == "poster"
    # The trained model's off-manifold reference stands (its training distances are not kept to
    # recompute it), raised only where the new source lies farther.
    _, trained = load_checkpoint_payload(verdict_model["work"] / "m.pt", CHECKPOINT_FORMAT)
    assert card["manifold_reference"]["distance"] >= trained["manifold_reference"]["distance"]
    assert card["open_set"]["threshold"] == result_threshold(tmp_path / "e.pt")
    new_rows = attribute_rows(tmp_path / "e.onnx", real_index, tmp_path / "new_test")
    # Frozen features trained on four other traces see posterisation only partly (it resembles the noise
    # source): twice chance (1/6) is what one new row can do on this toy set; the zoo's figures are in the README.
    assert sum(row.predicted == "poster" for row in new_rows) / len(new_rows) >= 2 / 6
    old_rows = attribute_rows(tmp_path / "e.onnx", real_index, dataset / "suspects")
    before = attribute_rows(verdict_model["model"], real_index, dataset / "suspects")
    for old, new in zip(before, old_rows):
        assert new.predicted in (old.predicted, "poster"), (
            "old rows are frozen: an old image can only move to the new class"
        )
    accuracy = [np.mean([row.predicted == Path(row.path).parent.name for row in rows]) for rows in (before, old_rows)]
    assert accuracy[1] >= accuracy[0] - 0.1, f"old classes: {accuracy[0]:.2f} before, {accuracy[1]:.2f} after"
    with pytest.raises(UsageError, match="already a class"):
        enroll(verdict_model["work"] / "m.pt", real_index, [("jpeg", str(tmp_path / "new_train"))], tmp_path / "f.onnx")
    # An export that fails (here ONNX Runtime and PyTorch disagree beyond the tolerance) leaves
    # neither the new model nor its checkpoint: the checkpoint used to stay, without its model.
    from manifpt_cli import export

    def disagree(*args):
        raise export.ExportParityError("ONNX Runtime outputs differ from PyTorch by 1, over the tolerance")

    with monkeypatch.context() as patched:
        patched.setattr(export, "_check_attributor", disagree)
        with pytest.raises(export.ExportParityError):
            enroll(
                verdict_model["work"] / "m.pt",
                real_index,
                [("poster", str(tmp_path / "new_train"))],
                tmp_path / "g.onnx",
            )
    assert not list(tmp_path.glob("*g.*")), "no g.pt, g.onnx or partial files"


def result_threshold(checkpoint: Path) -> float:
    _, metadata = load_checkpoint_payload(checkpoint, CHECKPOINT_FORMAT)
    return metadata["open_set"]["threshold"]


def test_a_model_of_the_previous_format_is_refused_with_the_reason(verdict_model, tmp_path):
    state, metadata = load_checkpoint_payload(verdict_model["work"] / "m.pt", CHECKPOINT_FORMAT)
    save_checkpoint(tmp_path / "old.pt", state, {**metadata, "format_version": 2})
    with pytest.raises(FormatError, match="version 2.*reads version 3"):
        load_checkpoint_payload(tmp_path / "old.pt", CHECKPOINT_FORMAT)


def test_train_cli_augments_and_sets_the_false_alarm_rate(artifacts_file, tmp_path):
    from typer.testing import CliRunner

    from manifpt_cli.cli import app

    out = tmp_path / "aug.pt"
    args = ["train", "--artifacts", artifacts_file, "--space", "rgb", "--epochs", "2", "--out", out, "-q"]
    result = CliRunner().invoke(app, [str(a) for a in [*args, "--augment", "jpeg:80,crop:0.8", "--target-fpr", "0.1"]])
    assert result.exit_code == 0, result.stderr
    assert "no 'real' class" in result.stderr, (
        "the session's artifacts have no real class: the CLI says what that means"
    )
    _, metadata = load_checkpoint_payload(out, CHECKPOINT_FORMAT)
    training = metadata["training"]
    assert training["augment"] == ["jpeg:80", "crop:0.8"] and training["augmented_copies"] > 0
    n_images = len(load_artifacts(artifacts_file, Space.RGB).samples.labels)
    assert training["train_size"] + training["val_size"] == n_images + training["augmented_copies"]
    assert metadata["open_set"]["target_fpr"] == 0.1
    # The rate the threshold gives a new image, from the validation split's size (the augmented
    # copies count as validation images here: they are what the threshold was set on).
    k = max(1, int(0.1 * (training["val_size"] + 1)))
    assert metadata["open_set"]["false_alarm_bound"] == pytest.approx(k / (training["val_size"] + 1))
    assert f"{metadata['open_set']['false_alarm_bound']:.3g} for new images" in result.stderr
    shares = metadata["open_set"]["validation_unknown_share"]  # the pooled threshold's false alarms, per class
    assert len(shares) == len(metadata["classes"]) and all(0 <= share <= 1 for share in shares)
    bad = CliRunner().invoke(app, [str(a) for a in [*args, "--overwrite", "--augment", "jpeg:101"]])
    assert bad.exit_code == 2 and "jpeg takes a quality" in bad.stderr
