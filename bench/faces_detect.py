"""Face detection speed: per real photo, and a 20-megapixel photo detected whole vs downscaled (facellm's way).

    OMP_NUM_THREADS=1 python bench/faces_detect.py

Photos: matplotlib's Grace Hopper, the two public-domain crops in tests/assets/faces, and the four-face group photo
the tests build from them. The reference for the large photo is running the detector on every pixel; facellm
downscales to ``max_side`` (1280) first and maps the boxes back. Prints milliseconds and the ratio.
"""

from __future__ import annotations

import time

from facellm_cli import faces
from facellm_cli.testing.faces import astronaut, camera, group_photo, hopper


def best_of(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    t0 = time.perf_counter()
    faces.check_available()
    print(f"load detector: {1000 * (time.perf_counter() - t0):.0f} ms (once per process)")
    group, centres = group_photo()
    photos = {"grace_hopper 512x600": hopper(), "astronaut 200x230": astronaut(), "camera 140x150": camera()}
    photos[f"group {group.width}x{group.height}"] = group
    for name, img in photos.items():
        n = len(faces.detect(img).faces)
        ms = 1000 * best_of(lambda img=img: faces.detect(img))
        print(f"{name:>24}: {n} face(s), {ms:6.1f} ms detect")
    align = hopper()
    face = faces.detect(align).faces[0]
    ms = 1000 * best_of(lambda: faces.crop(align, face))
    print(f"{'aligned 224 chip':>24}: {ms:6.1f} ms per face (second detection on the chip included)")
    huge = group.resize((group.width * 6, group.height * 6))
    whole = best_of(lambda: faces.detect(huge, max_side=max(huge.size)), n=1)
    scaled = best_of(lambda: faces.detect(huge), n=3)
    n_whole = len(faces.detect(huge, max_side=max(huge.size)).faces)
    n_scaled = len(faces.detect(huge).faces)
    print(
        f"{'20 MP photo 6000x3360':>24}: whole {1000 * whole:.0f} ms ({n_whole} faces), "
        f"downscaled to {faces.DETECT_MAX_SIDE} {1000 * scaled:.0f} ms ({n_scaled} faces): {whole / scaled:.1f}x faster"
    )


if __name__ == "__main__":
    main()
