"""A large real set from a small one: the crops of an array file under deterministic transforms.

For scale measurements (``bench/scale.py``, the README's million-image table) where making a
million crops with ``../shared/data/make_real.py`` would take most of an hour. Variant v of crop i
is the crop turned by (v mod 4) quarter turns, mirrored when (v div 4) is odd, and rolled by
4·(v div 8) pixels horizontally and vertically; rows are written variant by variant (all crops of
variant 0 first), straight into a memory-mapped ``.npy``, so memory stays small.

    python bench/tile_real.py --images ../shared/data/real32.npz --n 1000000 --out real1m.npy
"""

from __future__ import annotations

import argparse

import numpy as np


def variant(crops: np.ndarray, v: int) -> np.ndarray:
    turned = np.rot90(crops, k=v % 4, axes=(1, 2))
    if (v // 4) % 2:
        turned = turned[:, :, ::-1]
    shift = 4 * (v // 8)
    return np.roll(turned, (shift, shift), axis=(1, 2)) if shift else turned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True, help="an .npz with an 'images' array, or an .npy (N×S×S×3 uint8)")
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    loaded = np.load(args.images)
    crops = loaded["images"] if hasattr(loaded, "files") else loaded
    variants = -(-args.n // len(crops))
    most = 8 * (crops.shape[1] // 4)  # rolls of 4·k pixels for k below S / 4
    if variants > most:
        raise SystemExit(f"{args.n} rows need {variants} variants of {len(crops)} crops; at most {most}")
    out = np.lib.format.open_memmap(args.out, mode="w+", dtype=np.uint8, shape=(args.n, *crops.shape[1:]))
    for v in range(variants):
        start = v * len(crops)
        count = min(len(crops), args.n - start)
        out[start : start + count] = variant(crops[:count], v)
    out.flush()
    print(f"{args.n} rows ({variants} variants of {len(crops)} crops) → {args.out}")


if __name__ == "__main__":
    main()
