"""Real face photos for the face tests: matplotlib's Grace Hopper and two public-domain crops in tests/assets/faces."""

from __future__ import annotations

from typing import IO, cast

from PIL import Image

from .paths import ASSETS

DATA = ASSETS / "faces"


def hopper() -> Image.Image:
    import matplotlib.cbook

    sample = cast(IO[bytes], matplotlib.cbook.get_sample_data("grace_hopper.jpg"))  # a file object for a .jpg
    with sample as f:
        return Image.open(f).convert("RGB")


def astronaut() -> Image.Image:
    return Image.open(DATA / "astronaut_face.jpg").convert("RGB")


def camera() -> Image.Image:
    return Image.open(DATA / "camera_face.jpg").convert("RGB")


def group_photo() -> tuple[Image.Image, list[tuple[float, float]]]:
    """A 1000x560 'group photo' of four real faces at different sizes, and where each face's centre is.

    Hopper large (about 180 px face), the astronaut medium (about 95 px), the cameraman small (about 60 px)
    and a mirrored Hopper at about 40 px. Centres come from where each source's face sits, scaled and shifted.
    """
    canvas = Image.new("RGB", (1000, 560), (186, 196, 170))
    centres = []
    # (image, scale, paste position, face centre in the source image)
    parts = [
        (hopper(), 0.8, (20, 40), (266, 218)),
        (astronaut(), 1.0, (430, 120), (95, 107)),
        (camera(), 0.8, (680, 260), (65, 75)),
        (hopper().transpose(Image.Transpose.FLIP_LEFT_RIGHT), 0.18, (880, 60), (512 - 266, 218)),
    ]
    for img, scale, (px, py), (fx, fy) in parts:
        small = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
        canvas.paste(small, (px, py))
        centres.append((px + fx * scale, py + fy * scale))
    return canvas, centres
