"""Approximate FAISS indexes against the exact default search, in one run (figures, not pass/fail).

For rgb and freq, and for each search (the exact default; IVF256,Flat with nprobe 1/8/32; HNSW32
with efSearch 16/64/256), on the same generated queries, one thread each:
- recall@1: the share of queries whose neighbour is the exact search's, and how many got none;
- queries/s of `RealIndex.nearest` alone (the library's search, float64 re-ranking included);
- attribution accuracy with that search's neighbours.

Queries are held-out samples of three small zoo generators (trained for a few hundred iterations
on reals that are not indexed) and held-out reals. One attributor per space is trained on artifacts
extracted against the exact index (`extract_artifacts`, `train_attributor`, `export_onnx`) and
reused for every search: a model is tied to its index's hash, so the inputs are computed through
the library (`compute_artifacts` on each index, `OnnxAttributor.predict`) rather than by
`run_attribution`. Only the neighbour changes between rows, so the accuracy change is the search's
alone (an attributor trained per index would mix in its own training noise). nprobe and efSearch
are set on the index after it is opened; IVF256,Flat and HNSW32 are each built once.

Real images: ../shared/data/real32.npz when present, otherwise crops of the bundled photos.

    python3 bench/approximate_search.py [--reals 19000] [--per-source 600]   # one thread
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

FACTORIES = {"Flat": [None], "IVF256,Flat": [1, 8, 32], "HNSW32": [16, 64, 256]}
GENERATORS = {
    "gan-tconv-ns": {"family": "gan", "upsample": "tconv", "loss": "ns"},
    "gan-nearest-hinge": {"family": "gan", "upsample": "nearest", "loss": "hinge"},
    "vae-bilinear": {"family": "vae", "upsample": "bilinear"},
}


def set_search_parameter(index, value: int | None) -> None:
    """nprobe (IVF) or efSearch (HNSW) on an opened FAISS index."""
    import faiss

    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = value
    elif isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reals", type=int, default=19000, help="indexed reals")
    parser.add_argument("--per-source", type=int, default=600, help="samples per source: 2/3 train, 1/3 test")
    parser.add_argument("--gen-iters", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")  # before NumPy loads its BLAS
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import faiss
    import numpy as np
    from attribute_throughput import real_images, write_pngs

    from manifpt_cli.artifacts import compute_artifacts, extract_artifacts
    from manifpt_cli.attribute import OnnxAttributor
    from manifpt_cli.export import export_onnx
    from manifpt_cli.images import decode_folder
    from manifpt_cli.inputs import attributor_inputs
    from manifpt_cli.manifold import RealIndex, build_index
    from manifpt_cli.research.zoo import make_design, sample_generator, train_generator
    from manifpt_cli.settings import RunSettings
    from manifpt_cli.spaces import Space, make_embedder
    from manifpt_cli.train import TrainConfig, train_attributor

    settings = RunSettings(batch_size=256, workers=1, threads=1)
    settings.apply()
    faiss.omp_set_num_threads(1)
    started = time.perf_counter()
    n_train = args.per_source * 2 // 3
    reals, origin = real_images(args.reals + args.per_source, seed=0)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        np.save(work / "real.npy", reals[: args.reals])
        held_out = reals[args.reals :]
        write_pngs(work / "train" / "real", held_out[:n_train], "real")
        write_pngs(work / "test" / "real", held_out[n_train:], "real")
        write_pngs(work / "generator-reals", reals[:1000], "real")
        for name, choices in GENERATORS.items():
            design = make_design(**choices)
            train_generator(
                [work / "generator-reals"], work / "zoo" / name, design, iters=args.gen_iters, batch_size=32
            )
            sample_generator(work / "zoo" / name, n_train, work / "train" / name, seed=0)
            sample_generator(work / "zoo" / name, args.per_source - n_train, work / "test" / name, seed=1)
        print(f"{args.reals} indexed reals ({origin}); zoo trained, {time.perf_counter() - started:.0f} s")

        spaces = [Space.RGB, Space.FREQ]
        for factory in FACTORIES:
            seconds = time.perf_counter()
            build_index([work / "real.npy"], work / f"{factory}.h5", spaces, faiss_factory=factory, settings=settings)
            print(f"index build --faiss {factory}: {time.perf_counter() - seconds:.1f} s")

        sources = [(name, str(work / "train" / name)) for name in GENERATORS]
        extract_artifacts(
            work / "Flat.h5", sources, work / "artifacts.h5", real=work / "train" / "real", settings=settings
        )
        models = {}
        for space in spaces:
            train_attributor(
                work / "artifacts.h5",
                space,
                work / f"{space.value}.pt",
                config=TrainConfig(epochs=args.epochs),
                settings=settings,
            )
            export_onnx(work / f"{space.value}.pt", work / f"{space.value}.onnx")
            models[space] = OnnxAttributor(work / f"{space.value}.onnx", threads=1)

        decoded = [item for batch in decode_folder([work / "test"], 32, settings) for item in batch]
        pixels = np.stack([item.pixels for item in decoded])
        shas = [item.sha256 for item in decoded]
        truth = [Path(item.path).parent.name for item in decoded]
        print(
            f"{len(decoded)} test queries ({len(GENERATORS)} generators + held-out reals); "
            f"setup {time.perf_counter() - started:.0f} s"
        )
        print()
        print(
            "| space | search | parameters (header) | recall@1 | no neighbour | queries/s | attribution accuracy | change |"
        )
        print("|---|---|---|---:|---:|---:|---:|---:|")
        for space in spaces:
            embedder = {space: make_embedder(space)}
            model = models[space]
            labels = np.array([model.classes.index(name) for name in truth])
            exact_ids, exact_accuracy = None, None
            for factory, values in FACTORIES.items():
                with RealIndex(work / f"{factory}.h5") as index:
                    queries = embedder[space](pixels)
                    index.nearest(space, queries[:8], shas[:8])  # loads the index
                    for value in values:
                        if value is not None:
                            set_search_parameter(index.faiss_index(space), value)
                        seconds = time.perf_counter()
                        neighbours = index.nearest(space, queries, shas)
                        seconds = time.perf_counter() - seconds
                        found = compute_artifacts(index, embedder, pixels, shas)[space]
                        assert np.array_equal(found.neighbours.ids, neighbours.ids)
                        probabilities, _, _ = model.predict(
                            attributor_inputs(model.input_kind, pixels, found.artifacts)
                        )
                        accuracy = float(np.mean(probabilities.argmax(axis=1) == labels))
                        if exact_ids is None:
                            exact_ids, exact_accuracy = found.neighbours.ids, accuracy
                        description = index.search_description(space)
                        parameters = ", ".join(f"{k}={v}" for k, v in description["parameters"].items()) or "—"
                        kind = "exact" if description["exact"] else "approximate"
                        print(
                            f"| {space.value} | {factory} ({kind}) | {parameters} | "
                            f"{np.mean(found.neighbours.ids == exact_ids):.3f} | {np.sum(found.neighbours.ids < 0)} | "
                            f"{len(pixels) / seconds:,.0f} | "
                            f"{accuracy:.3f} | {accuracy - exact_accuracy:+.3f} |"
                        )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
