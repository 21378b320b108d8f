"""Real-set scale on one machine: `index build` and `attribute` on a large array of real images.

Not a test (figures, not pass/fail). From one uint8 N×S×S×3 array file of real crops (for example
``../shared/data/make_real.py --n 31000 --size 256 --npy real256.npy``), one run:

1. writes its first ``--index-rows`` rows as the real set, and makes two toy "sources" (blur and
   JPEG q30 of held-out rows) plus held-out real rows as suspects;
2. `manifpt index build` of the real set, `extract`, `train` (small CNN, ``--epochs``), `export`;
3. `manifpt attribute` of the suspects;

each as its own process under GNU ``/usr/bin/time`` (wall time and the peak resident memory of
that process), and prints the table the README quotes, with the machine.

    python bench/scale.py --images real256.npy --index-rows 30000 --spaces rgb [--suspects 600]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


def run(*args: str) -> tuple[float, float]:
    """(seconds, peak resident MiB) of one `manifpt` command, measured by /usr/bin/time (GNU time):
    the peak of the command's own process, whatever this script holds."""
    quiet = [] if args[0] == "export" else ["-q"]  # export has no progress to silence
    command = ["/usr/bin/time", "-f", "manifpt-scale %e %M", sys.executable, "-m", "manifpt_cli", *args, *quiet]
    result = subprocess.run(command, stderr=subprocess.PIPE, text=True)
    sys.stderr.write(result.stderr)
    if result.returncode not in (0, 3):
        raise SystemExit(f"manifpt {' '.join(args)} exited {result.returncode}")
    seconds, kib = result.stderr.rsplit("manifpt-scale ", 1)[1].split()
    return float(seconds), int(kib) / 1024


def degrade(kind: str, pixels: np.ndarray) -> np.ndarray:
    image = Image.fromarray(pixels)
    if kind == "blur":
        return np.asarray(image.filter(ImageFilter.GaussianBlur(1.5)))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=30)
    return np.asarray(Image.open(buffer).convert("RGB"))


def write_pngs(folder: Path, images, prefix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{prefix}_{i:05d}.png", compress_level=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True, help="uint8 N×S×S×3 .npy of real crops")
    parser.add_argument("--index-rows", type=int, required=True)
    parser.add_argument("--spaces", default="rgb")
    parser.add_argument("--suspects", type=int, default=600, help="held-out suspects (a third each source)")
    parser.add_argument("--train-per-source", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--attribute-batch-size", type=int, default=64, help="attribute's --batch-size")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()

    images = np.load(args.images, mmap_mode="r")
    n, size = args.index_rows, images.shape[1]
    held_out = images.shape[0] - n
    need = 2 * args.train_per_source + args.suspects
    if held_out < need:
        raise SystemExit(f"{args.images} has {held_out} rows beyond --index-rows; {need} are needed")
    work = args.work or Path(tempfile.mkdtemp(prefix="manifpt-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    reals = np.lib.format.open_memmap(work / "real.npy", mode="w+", dtype=np.uint8, shape=(n, *images.shape[1:]))
    for start in range(0, n, 4096):
        reals[start : start + 4096] = images[start : min(start + 4096, n)]
    reals.flush()
    del reals
    rest = np.asarray(images[n : n + need])
    per = args.suspects // 3
    for i, kind in enumerate(("blur", "jpeg")):
        train = rest[i * args.train_per_source : (i + 1) * args.train_per_source]
        write_pngs(work / "train" / kind, [degrade(kind, x) for x in train], kind)
    suspects = rest[2 * args.train_per_source :]
    write_pngs(work / "suspects" / "blur", [degrade("blur", x) for x in suspects[:per]], "blur")
    write_pngs(work / "suspects" / "jpeg", [degrade("jpeg", x) for x in suspects[per : 2 * per]], "jpeg")
    write_pngs(work / "suspects" / "real", suspects[2 * per : 3 * per], "real")

    space = args.spaces.split(",")[0]
    index, artifacts, model = str(work / "real.h5"), str(work / "artifacts.h5"), str(work / "model.pt")
    sources = ["--source", f"blur={work / 'train' / 'blur'}", "--source", f"jpeg={work / 'train' / 'jpeg'}"]
    steps = {
        "index build": (
            "index",
            "build",
            str(work / "real.npy"),
            "--out",
            index,
            "--space",
            args.spaces,
            "--size",
            str(size),
        ),
        "extract": ("extract", "--index", index, *sources, "--out", artifacts),
        "train": ("train", "--artifacts", artifacts, "--space", space, "--epochs", str(args.epochs), "--out", model),
        "export": ("export", model, "--out", str(work / "model.onnx")),
        "attribute": (
            "attribute",
            str(work / "suspects"),
            "--model",
            str(work / "model.onnx"),
            "--index",
            index,
            "--report",
            "csv",
            "--out",
            str(work / "report.csv"),
            "--batch-size",
            str(args.attribute_batch_size),
        ),
    }
    results = {name: run(*command) for name, command in steps.items()}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {n} reals {size}×{size} in {args.spaces}")
    print(f"index file: {os.path.getsize(index) / 2**30:.2f} GiB")
    for name, (seconds, peak) in results.items():
        count = {"index build": n, "attribute": 3 * per}.get(name)
        rate = f", {count / seconds:,.0f} images/s" if count else ""
        print(f"{name:12s} {seconds:8.1f} s{rate}; peak resident memory {peak:,.0f} MiB")
    if args.work is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
