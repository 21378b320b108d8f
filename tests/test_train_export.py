"""Training, safe checkpoints and ONNX export with the ONNX Runtime parity check."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from manifpt_cli.artifacts import LabelledSamples
from manifpt_cli.errors import FormatError, UsageError
from manifpt_cli.export import export_onnx
from manifpt_cli.formats import save_checkpoint
from manifpt_cli.inputs import InputKind, TrainingSet
from manifpt_cli.spaces import FEATURE_DIM, BackboneWeights, Space, load_backbone
from manifpt_cli.train import TrainConfig, fit, load_checkpoint, stratified_split, train_attributor
from models import create_model, list_models


def toy_artifacts(space: Space, n_per_class: int = 12, classes: int = 3) -> TrainingSet:
    """Artifacts whose class is encoded in their mean, so a network can learn them in a few steps."""
    rng = np.random.default_rng(0)
    shape = space.artifact_shape(16)
    labels = np.repeat(np.arange(classes), n_per_class)
    artifacts = (rng.normal(0, 1, (len(labels), *shape)) + labels.reshape(-1, *[1] * len(shape))).astype(np.float32)
    names, blank = [f"model_{i}" for i in range(classes)], [""] * len(labels)
    samples = LabelledSamples(labels, names, 16, "f" * 64, blank, blank)
    backbone = BackboneWeights("random:0", "e" * 64) if space.needs_backbone else None
    return TrainingSet(samples, artifacts, InputKind.ARTIFACT, space.value, space, backbone)


def test_stratified_split_keeps_every_class_on_both_sides():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 2)
    train, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    assert np.bincount(labels[val]).tolist() == [2, 1, 1]
    assert np.array_equal(stratified_split(labels, 0.2, 0)[1], val), "fixed by the seed"
    # Distinct files split as rows do; copies of one file (one SHA-256) stay on one side.
    distinct = [f"{i:064x}" for i in range(len(labels))]
    assert all(np.array_equal(a, b) for a, b in zip(stratified_split(labels, 0.2, 0, distinct), (train, val)))
    copies = [f"{labels[i]}:{i // 3}" for i in range(len(labels))]  # up to three rows a file, in its class
    for seed in range(5):
        train, val = stratified_split(labels, 0.2, seed, copies)
        assert not {copies[i] for i in train} & {copies[i] for i in val}
        assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))


@pytest.mark.parametrize("arch", list_models())
def test_every_attributor_trains_saves_and_exports(tmp_path, arch):
    space = Space.SL if arch == "mlp" else Space.RGB
    data = toy_artifacts(space)
    model, metadata, history = fit(data, TrainConfig(arch=arch, epochs=2, batch_size=8))
    assert len(history) == 2 and metadata["classes"] == data.samples.label_names
    checkpoint = tmp_path / f"{arch}.pt"
    save_checkpoint(checkpoint, model.state_dict(), metadata)
    payload = torch.load(checkpoint, weights_only=True)  # no pickled code: plain tensors and a JSON string
    assert set(payload) == {"state_dict", "metadata"} and json.loads(payload["metadata"])["arch"] == arch
    if space is Space.RGB:
        result = export_onnx(checkpoint, tmp_path / f"{arch}.onnx")
        assert result.max_probability_diff <= 1e-4
        session = ort.InferenceSession(str(tmp_path / f"{arch}.onnx"), providers=["CPUExecutionProvider"])
        probabilities = session.run(["probabilities"], {"artifact": data.inputs[:5]})[0]
        assert probabilities.shape == (5, 3) and np.allclose(probabilities.sum(1), 1, atol=1e-5)


def test_training_learns_separable_artifacts():
    model, metadata, _ = fit(
        toy_artifacts(Space.RGB, n_per_class=20), TrainConfig(arch="small", epochs=8, batch_size=8)
    )
    assert metadata["training"]["val_accuracy"] >= 0.8


def test_standardisation_statistics_travel_with_the_weights(tmp_path):
    data = toy_artifacts(Space.RGB)
    data.inputs = data.inputs * 50 + 7
    model, metadata, _ = fit(data, TrainConfig(arch="small", epochs=1, batch_size=8))
    save_checkpoint(tmp_path / "m.pt", model.state_dict(), metadata)
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert loaded.standardize.mean.mean().item() == pytest.approx(data.inputs.mean(), rel=0.05)


def test_export_writes_the_model_card(tmp_path, artifacts_file):
    checkpoint = tmp_path / "rgb.pt"
    train_attributor(artifacts_file, Space.RGB, checkpoint, config=TrainConfig(arch="small", epochs=1))
    export_onnx(checkpoint, tmp_path / "rgb.onnx")
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "rgb.onnx")).metadata_props}
    card = json.loads(props["manifpt"])
    assert json.loads(props["classes"]) == ["jpeg", "blur", "nearest", "noise"] == card["classes"]
    assert props["space"] == "rgb" and props["image_size"] == "32" and len(props["index_hash"]) == 64
    assert card["training"]["artifacts_file"].endswith("artifacts.h5") and card["parity_tolerance"] == 1e-4


def test_feature_space_export_ships_the_backbone(tmp_path):
    data = toy_artifacts(Space.SL)
    model, metadata, _ = fit(data, TrainConfig(arch="mlp", epochs=1, batch_size=8))
    metadata["backbone"] = {"source": "random:0", "sha256": load_backbone(Space.SL, "random:0")[1].sha256}
    save_checkpoint(tmp_path / "sl.pt", model.state_dict(), metadata)
    result = export_onnx(tmp_path / "sl.pt", tmp_path / "sl.onnx")
    assert result.backbone_path.endswith("sl.backbone.onnx") and result.max_embedding_diff < 1e-3
    session = ort.InferenceSession(result.backbone_path, providers=["CPUExecutionProvider"])
    assert session.run(["embedding"], {"image": np.random.rand(3, 3, 16, 16).astype(np.float32)})[0].shape == (
        3,
        FEATURE_DIM,
    )


def test_a_checkpoint_with_compressed_members_is_refused_before_it_is_unpacked(freq_model, tmp_path):
    """torch.save stores its members as they are; a deflated one (a 3.6 MB file can hold gigabytes
    of zeros, which torch.load unpacks whole) is refused first. The checkpoint as saved loads."""
    genuine = freq_model / "freq.pt"
    with (
        zipfile.ZipFile(genuine) as source,
        zipfile.ZipFile(tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as out,
    ):
        for member in source.infolist():
            out.writestr(member.filename, source.read(member))
    with pytest.raises(FormatError, match="holds compressed members"):
        load_checkpoint(tmp_path / "deflated.pt")
    load_checkpoint(genuine)


def test_bad_checkpoints_and_options(tmp_path, artifacts_file):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FormatError, match="not a readable manifpt-attributor checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(UsageError, match="choose one of: mlp, resnet18, resnet50, small"):
        train_attributor(artifacts_file, Space.RGB, tmp_path / "x.pt", config=TrainConfig(arch="nope", epochs=1))
    with pytest.raises(UsageError, match="must end in .onnx"):
        export_onnx(tmp_path / "junk.pt", tmp_path / "model.bin")
    assert create_model("mlp", (3, 4, 4), 2)(torch.zeros(2, 3, 4, 4)).shape == (2, 2)


def test_space_auto_picks_on_validation_and_attributes_with_the_chosen_input(
    tmp_path, artifacts_file, real_index, dataset
):
    from manifpt_cli.attribute import Attribution
    from manifpt_cli.train import train_auto

    result = train_auto(artifacts_file, tmp_path / "auto.pt", config=TrainConfig(epochs=2))
    table = result.metadata["auto"]["validation"]
    assert [row["input"] for row in table] == ["rgb", "freq", "image", "image+rgb", "image+freq"]
    assert result.metadata["auto"]["splits"] == 2
    for row in table:
        assert len(row["per_split"]) == 2 and row["val_accuracy"] == pytest.approx(np.mean(row["per_split"]))
    best = max(table, key=lambda row: row["val_accuracy"])  # the first of equals, as train_auto breaks ties
    assert result.metadata["auto"]["chosen"] == best["input"]
    expected_kind = {"rgb": "artifact", "freq": "artifact", "image": "image"}.get(best["input"], "image+artifact")
    assert result.metadata["input"] == expected_kind
    export_onnx(tmp_path / "auto.pt", tmp_path / "auto.onnx")
    with Attribution(tmp_path / "auto.onnx", real_index) as run:
        rows = list(run.rows([dataset / "suspects" / "noise"]))
    assert rows and all(row.ok and row.predicted for row in rows)


def test_joint_input_model_attributes(tmp_path, artifacts_file, real_index, dataset):
    """Force the image+artifact path through export and ONNX attribution (the 6-channel input)."""
    from manifpt_cli.attribute import Attribution
    from manifpt_cli.inputs import auto_candidates

    joint = next(c for c in auto_candidates(artifacts_file) if c.name == "image+freq")
    model, metadata, _ = fit(joint, TrainConfig(epochs=1))
    assert metadata["input"] == "image+artifact" and metadata["input_shape"] == [6, 32, 32]
    save_checkpoint(tmp_path / "joint.pt", model.state_dict(), metadata)
    export_onnx(tmp_path / "joint.pt", tmp_path / "joint.onnx")
    with Attribution(tmp_path / "joint.onnx", real_index) as run:
        assert all(row.ok for row in run.rows([dataset / "suspects" / "blur"]))


def test_training_with_augmentation_never_writes_over_the_index_it_searches(artifacts_file, real_index, tmp_path):
    """``train --augment`` reads the index (the copies' artifacts are searched in it): its
    checkpoint may not replace it, named with --index or recorded in the artifacts file."""
    import shutil

    from manifpt_cli.artifacts import artifacts_index_path
    from manifpt_cli.outputs import OutputRefusedError
    from manifpt_cli.perturb import parse_perturbations
    from manifpt_cli.train import _inputs

    index = shutil.copy(real_index, tmp_path / "index.h5")
    before = (tmp_path / "index.h5").read_bytes()
    augment = parse_perturbations("jpeg:90")
    with pytest.raises(OutputRefusedError, match="it is the input"):
        train_attributor(artifacts_file, Space.RGB, index, augment=augment, index_path=index, overwrite=True)
    assert (tmp_path / "index.h5").read_bytes() == before
    assert artifacts_index_path(artifacts_file) in _inputs(artifacts_file, augment, None, None)
    assert _inputs(artifacts_file, None, index, None) == [artifacts_file], "without augmentation it is not read"
