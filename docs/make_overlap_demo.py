"""Build the README's overlap demo: generated faces on random backgrounds, and a FaceXBench copy that leaks some.

The faces of ``facellm dev synth-faces`` share one drawing template and plain backgrounds, so many of them are
near-identical pictures (see the rates in README "Benchmark overlap"); here each face gets its own smooth random
background, a stand-in for the different backgrounds and lighting of photos. Three FaceXBench question files are
copied from ``../shared/facexbench`` (or $FACEXBENCH_DIR, else the subsets in tests/assets) and each of their images is written as another face;
every 25th FairFace image is instead a training face, cropped by a few pixels, resized to 224 px and re-encoded as
JPEG quality 70.

    python docs/make_overlap_demo.py /tmp/overlap-demo
    cd /tmp/overlap-demo && facellm data overlap faces --benchmark facexbench --data-dir facexbench \\
        --sheet contact_sheet.png
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

from PIL import Image

from facellm_cli.images import open_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from overlap_accuracy import generated_face  # noqa: E402 - the bench's face generator, one copy

FILES = ("fairface_single_mcq_age_test.json", "fairface_single_mcq_gender_test.json", "lapa_single_mcq.json")


def face(seed: int, size: int = 160) -> Image.Image:
    return generated_face(seed, size, textured=True)


def main(dst: Path) -> None:
    shared = Path(
        os.environ.get("FACEXBENCH_DIR") or Path(__file__).resolve().parents[1] / ".." / "shared" / "facexbench"
    )
    bench_src = shared / "benchmark" if (shared / "benchmark").is_dir() else shared
    if not all((bench_src / f).is_file() for f in FILES):
        # A clean clone: the 30-question subsets committed with the tests (the README's numbers are from all questions).
        bench_src = Path(__file__).resolve().parents[1] / "tests" / "assets" / "facexbench" / "benchmark"
    (dst / "faces").mkdir(parents=True)
    train = [face(i) for i in range(400)]
    for i, img in enumerate(train):
        img.save(dst / "faces" / f"face_{i:05d}.png")
    bench = dst / "facexbench" / "benchmark"
    bench.mkdir(parents=True)
    k = 0
    for name in FILES:
        shutil.copy(bench_src / name, bench / name)
        meta = json.loads((bench / name).read_text(encoding="utf-8"))
        paths = sorted({p for q in meta["questions"].values() for p in q["image_paths"]})
        for i, rel in enumerate(paths):
            out = bench / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            if name.startswith("fairface") and i % 25 == 0:
                src = train[(k * 37) % len(train)]
                k += 1
                w, h = src.size
                buf = io.BytesIO()
                src.crop((2, 1, w - 2, h - 3)).resize((224, 224)).save(buf, format="JPEG", quality=70)
                open_image(buf.getvalue()).save(out, format="PNG")
            else:
                face(100_000 + 1000 * len(name) + i).resize((224, 224)).save(out, format="PNG")
    print(f"{len(train)} training faces; {k} benchmark images are copies of them -> {dst}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
