"""False-negative and false-positive rates of the overlap check on generated faces.

Positives: each face against a transformed copy of itself (JPEG quality 70,
resized 0.5-2x, cropped 0-CROP px per side, grayscale, and all of them at
once). Negatives: every pair of different faces (other seeds: other people,
colours, poses, expressions). Prints the rates at several --max-distance
values; the default threshold is marked.

The generated faces share one drawing template and seven plain backgrounds,
so many pairs are near-identical pictures; ``--textured`` gives each face its
own smooth random background instead (a stand-in for the backgrounds and
lighting that tell photos apart).

    python bench/overlap_accuracy.py --faces 300 --size 256 --crop 3
    python bench/overlap_accuracy.py --faces 300 --size 256 --crop 3 --textured
"""

from __future__ import annotations

import argparse
import io
import random

import numpy as np
from PIL import Image

from facellm_cli.data.overlap import (
    DEFAULT_MAX_COLOUR_DISTANCE,
    DEFAULT_MAX_DISTANCE,
    hamming_pairs,
    match,
    signature,
    signatures_from,
)
from facellm_cli.images import open_image
from facellm_cli.synth import BACKGROUNDS, draw_face, random_attributes


def generated_face(seed: int, size: int, textured: bool) -> Image.Image:
    """A generated face; with ``textured`` its plain background is replaced by smooth random colours."""
    rng = random.Random(seed)
    attrs = random_attributes(rng)
    img = draw_face(attrs, size, rng)
    if not textured:
        return img
    arr = np.asarray(img, dtype=np.int16)
    cells = np.random.default_rng(seed).integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    noise = np.asarray(Image.fromarray(cells).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
    bg = np.abs(arr - np.array(BACKGROUNDS[attrs.background])).max(axis=2) <= 8
    arr[bg] = noise[bg]
    return Image.fromarray(arr.astype(np.uint8))


def jpeg(img: Image.Image, quality: int = 70) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return open_image(buf.getvalue())


def transforms(img: Image.Image, rng: random.Random, crop: int) -> dict[str, Image.Image]:
    w, h = img.size
    s = rng.uniform(0.5, 2.0)
    box = (rng.randint(0, crop), rng.randint(0, crop), w - rng.randint(0, crop), h - rng.randint(0, crop))
    return {
        "jpeg q70": jpeg(img),
        "resize 0.5-2x": img.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC),
        f"crop 0-{crop} px": img.crop(box),
        "grayscale": img.convert("L").convert("RGB"),
        "all four": jpeg(img.crop(box).resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC).convert("L")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=int, default=300)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--crop", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--textured", action="store_true", help="Random backgrounds instead of plain ones.")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    faces = [generated_face(rng.getrandbits(64), args.size, args.textured) for _ in range(args.faces)]
    names = [f"face{i}" for i in range(len(faces))]
    base = signatures_from([signature(f) for f in faces], names)
    copies: dict[str, list[Image.Image]] = {}
    for f in faces:
        for kind, img in transforms(f, rng, args.crop).items():
            copies.setdefault(kind, []).append(img)
    n_neg = len(faces) * (len(faces) - 1) // 2
    print(
        f"{len(faces)} {'textured ' if args.textured else ''}faces of {args.size} px; positives: {len(faces)} per transform; "
        f"negatives: {n_neg} pairs of different faces"
    )
    copy_sigs = {k: signatures_from([signature(i) for i in imgs], names) for k, imgs in copies.items()}
    print(f"| max-distance | {' | '.join(f'FN {k}' for k in copies)} | FP (of {n_neg}) | FP rate |")
    print("|---:|" + "---:|" * (len(copies) + 2))
    for d in (6, 8, 10, 12, 14, 16, 20):
        fns = []
        for sig in copy_sigs.values():
            found = {(a, b) for a, b, _, _ in match(base, sig, d, DEFAULT_MAX_COLOUR_DISTANCE) if a == b}
            fns.append(f"{len(faces) - len(found)}")
        fp = sum(1 for a, b, _, _ in match(base, base, d, DEFAULT_MAX_COLOUR_DISTANCE) if a < b)
        mark = " (default)" if d == DEFAULT_MAX_DISTANCE else ""
        print(f"| {d}{mark} | {' | '.join(fns)} | {fp} | {100 * fp / n_neg:.3f}% |")
    i, _, _ = hamming_pairs(base.words, base.words, DEFAULT_MAX_DISTANCE)
    print(f"(structure hash alone at the default threshold: {(len(i) - len(faces)) // 2} negative pairs)")


if __name__ == "__main__":
    main()
