"""Verdict quality on a generator zoo: closed-set accuracy against a raw-pixel baseline, open-set
(leave-one-generator-out), calibration, robustness to perturbations with and without augmentation,
and what real photographs outside the index come out as. Figures, not pass/fail.

Real photos: ../shared/data/real32.npz when present, split **by source photo** into three disjoint
sets: the zoo's training photos, the index, and held-out real photos that are never indexed or
trained on. Without it, crops of the photos bundled with scikit-image (smaller, less varied).

    python bench/verdict_quality.py --work /tmp/quality [--per-generator 800] [--epochs 15] [--seeds 2]
        [--inputs freq,image]

"default" below is `manifpt train`'s default (`--space auto` over 2 validation splits).

Every step keeps its outputs in --work and is skipped when they exist, so a run can be resumed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "real32.npz"
# (name, family, upsampling, normalisation, GAN loss): eight generators, four families.
ZOO = (
    ("gan-tconv-ns", "gan", "tconv", "batch", "ns"),
    ("gan-nearest-hinge", "gan", "nearest", "batch", "hinge"),
    ("gan-bilinear-lsgan", "gan", "bilinear", "batch", "lsgan"),
    ("gan-pixelshuffle-ns", "gan", "pixelshuffle", "none", "ns"),
    ("vae-bilinear", "vae", "bilinear", "batch", None),
    ("vae-tconv", "vae", "tconv", "group", None),
    ("flow-realnvp", "flow", None, None, None),
    ("diffusion-unet", "diffusion", "nearest", "group", None),
)
PERTURB = "jpeg:90,jpeg:75,resize:0.5,blur:1.0,crop:0.9"


def write_pngs(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:05d}.png")


def real_splits(work: Path, n_zoo: int, n_index: int, n_test: int, seed: int) -> str:
    """Three photo-disjoint real sets on disk; returns where they came from."""
    if (work / "real_test").is_dir():
        return "existing"
    rng = np.random.default_rng(seed)
    if SHARED.is_file():
        data = np.load(SHARED)
        images, photo = data["images"], data["source_id"]
        photos = rng.permutation(np.unique(photo))
        thirds = np.array_split(photos, [int(0.45 * len(photos)), int(0.85 * len(photos))])
        groups = [rng.permutation(np.flatnonzero(np.isin(photo, part))) for part in thirds]
        origin = f"{SHARED.name} (split by source photo: {', '.join(str(len(t)) for t in thirds)} photos)"
    else:
        from manifpt_cli.research.samples import bundled_photo_paths, random_crops

        paths = bundled_photo_paths()
        parts = np.array_split(rng.permutation(len(paths)), 3)
        total = [n_zoo, n_index, n_test]
        crops = [
            np.stack([c for i in part for c in random_crops(paths[i], total[k] // len(part) + 1, 32, rng)])
            for k, part in enumerate(parts)
        ]
        images = np.concatenate(crops)
        offsets = np.cumsum([0, *(len(c) for c in crops)])
        groups = [np.arange(offsets[k], offsets[k + 1]) for k in range(3)]
        origin = "crops of the photos bundled with scikit-image (split by photo)"
    for name, rows, n in zip(("real_zoo", "real_index", "real_test"), groups, (n_zoo, n_index, n_test)):
        write_pngs(work / name, images[rows[:n]])
    return origin


def zoo(work: Path, per_generator: int, iters: int, seed: int) -> list[str]:
    from manifpt_cli.research.zoo import make_design, sample_generator, train_generator

    for name, family, upsample, norm, loss in ZOO:
        if (work / "fakes" / name).is_dir():
            continue
        design = make_design(family, upsample, norm, loss, size=32, width=16)
        model = work / "zoo" / name
        train_generator([work / "real_zoo"], model, design, iters=iters, batch_size=32, seed=seed, overwrite=True)
        sample_generator(model, per_generator, work / "fakes" / name, seed=seed + 1, overwrite=True)
    return [name for name, *_ in ZOO]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--per-generator", type=int, default=800)
    parser.add_argument("--index-size", type=int, default=5000)
    parser.add_argument("--real-test", type=int, default=500)
    parser.add_argument("--zoo-iters", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument(
        "--inputs",
        default="freq,image",
        help="attributor inputs to stress (auto candidate names); the first also with --augment",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from manifpt_cli.artifacts import REAL_FROM_INDEX, extract_artifacts, load_pixels
    from manifpt_cli.casework import run_attribution
    from manifpt_cli.export import export_onnx
    from manifpt_cli.inputs import auto_candidates
    from manifpt_cli.manifold import build_index
    from manifpt_cli.perturb import parse_perturbations
    from manifpt_cli.research.evaluate import Stress, evaluate_set
    from manifpt_cli.spaces import Space
    from manifpt_cli.train import TrainConfig, train_attributor, train_auto

    started = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / "quality.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2))

    def stage(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f} s] {message}", flush=True)

    stage("real photos")
    results.setdefault("real_photos", real_splits(work, 6000, args.index_size, args.real_test, args.seed))
    stage("zoo")
    generators = zoo(work, args.per_generator, args.zoo_iters, args.seed)
    index, artifacts = work / "real.h5", work / "artifacts.h5"
    if not index.exists():
        stage("index")
        build_index([work / "real_index"], index, [Space.RGB, Space.FREQ], size=32)
    if not artifacts.exists():
        stage("extract (real class from the index, leave-one-out)")
        sources = [(name, str(work / "fakes" / name)) for name in generators]
        extract_artifacts(index, sources, artifacts, real=REAL_FROM_INDEX)
    config = TrainConfig(epochs=args.epochs)
    for folder in ("closed", "stress"):
        (work / folder).mkdir(exist_ok=True)
    perturb = parse_perturbations(PERTURB)

    closed = results.setdefault("closed_set", {})
    for candidate in auto_candidates(artifacts):
        if candidate.name in closed:
            continue
        stage(f"closed set: {candidate.name}")
        found = evaluate_set(
            candidate,
            work / "closed" / candidate.name.replace("+", "_"),
            seeds=args.seeds,
            config=config,
            overwrite=True,
        )
        closed[candidate.name] = {"accuracy_mean": found.accuracy_mean, "accuracy_std": found.accuracy_std}
        save()

    candidates = {candidate.name: candidate for candidate in auto_candidates(artifacts)}
    pixels = load_pixels(artifacts).pixels
    for position, name in enumerate(args.inputs.split(",")):
        for augmented in (False, True) if position == 0 else (False,):
            key = f"{name}{' + augment' if augmented else ''}"
            if key in results.get("stress", {}):
                continue
            stage(f"open set, calibration, robustness: {key}")
            stress = Stress(
                open_set=not augmented,
                perturbations=perturb,
                augment=perturb if augmented else [],
                pixels=pixels,
                index_path=str(index),
            )
            found = evaluate_set(
                candidates[name],
                work / "stress" / key.replace(" + ", "_").replace("+", "_"),
                seeds=args.seeds,
                config=config,
                stress=stress,
                overwrite=True,
            )
            metrics = found.metrics
            results.setdefault("stress", {})[key] = {
                "accuracy_mean": metrics["accuracy_mean"],
                "calibration": {k: metrics["calibration"][k] for k in ("ece", "brier", "ece_before", "brier_before")},
                "verdicts": metrics["verdicts"],
                "open_set": {k: v for k, v in metrics.get("open_set", {}).items() if k != "per_held_out_by_score"},
                "robustness": metrics["robustness"],
            }
            save()

    for name in ("freq", "default"):
        key = f"real_test_{name}"
        if key in results:
            continue
        stage(f"held-out real photos through train ({name}) → export → attribute")
        checkpoint, model = work / f"{name}.pt", work / f"{name}.onnx"
        if name == "default":
            trained = train_auto(artifacts, checkpoint, config=config, overwrite=True)
        else:
            trained = train_attributor(artifacts, Space(name), checkpoint, config=config, overwrite=True)
        export_onnx(checkpoint, model, overwrite=True)
        rows = []
        run_attribution(model, index, [work / "real_test"], on_row=rows.append)
        verdicts = [row.verdict for row in rows if row.ok]
        shares = {v: verdicts.count(v) / len(verdicts) for v in sorted(set(verdicts))}
        results[key] = {
            "input": trained.metadata.get("auto", {}).get("chosen", name),
            "n": len(verdicts),
            "shares": shares,
            "not_a_known_source": sum(shares.get(v, 0) for v in ("real", "unknown", "inconclusive")),
        }
        save()

    results["machine"] = f"{platform.machine()}, {__import__('os').cpu_count()} cores, {platform.processor() or 'cpu'}"
    results["seconds"] = round(time.perf_counter() - started)
    save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
