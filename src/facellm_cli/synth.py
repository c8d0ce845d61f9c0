"""Drawn faces with known, visible attributes: data for learning tests and the quickstart.

Each face is drawn with PIL at 4x the output size and downsampled, so the
features that carry a label stay visible at 64x64: the mouth is a thick arc
(curving up = smiling, flat = neutral, curving down = frowning), eyes are open
discs with pupils or thick closed lines, glasses are dark rims with a bridge,
and pose is a tilt of the whole head. Everything (attributes, jitter, colours)
comes from per-face seeds drawn from one ``random.Random(seed)``, and PNGs
carry no timestamps, so the same seed gives byte-identical files however many
processes draw them.
"""

from __future__ import annotations

import csv
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FacellmError, OutputExistsError
from .reporting import SILENT, Reporter

if TYPE_CHECKING:
    from PIL import Image as PILImage

EXPRESSIONS = ("smiling", "neutral", "frowning")
EYES = ("open", "closed")
POSES = ("left", "upright", "right")
GLASSES = ("yes", "no")
SKIN_TONES = {
    "very_light": (247, 224, 206),
    "light": (234, 192, 160),
    "medium": (204, 152, 110),
    "tan": (170, 118, 80),
    "brown": (128, 84, 54),
    "dark": (86, 56, 38),
}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "gray": (150, 150, 150),
    "blue": (90, 140, 210),
    "green": (110, 180, 110),
    "yellow": (230, 210, 110),
    "pink": (230, 160, 190),
    "purple": (150, 110, 190),
}
LABEL_COLUMNS = ("file", "expression", "eyes", "pose", "glasses", "skin_tone", "background")
_TILT_DEGREES = 18
_SCALE = 4


@dataclass(frozen=True)
class FaceAttributes:
    """The label row of one drawn face (the CSV columns after ``file``)."""

    expression: str
    eyes: str
    pose: str
    glasses: str
    skin_tone: str
    background: str


def random_attributes(rng: random.Random, expression: str | None = None) -> FaceAttributes:
    """Draw every attribute uniformly (``expression`` may be fixed to balance a set)."""
    return FaceAttributes(
        expression=expression or rng.choice(EXPRESSIONS),
        eyes=rng.choice(EYES),
        pose=rng.choice(POSES),
        glasses=rng.choice(GLASSES),
        skin_tone=rng.choice(sorted(SKIN_TONES)),
        background=rng.choice(sorted(BACKGROUNDS)),
    )


def _check_size(size: int) -> None:
    if size < 32:
        raise FacellmError(f"face size {size} is too small to show the attributes; use --size 32 or more")


def draw_face(attrs: FaceAttributes, size: int = 64, rng: random.Random | None = None) -> PILImage.Image:
    """Render one face. ``rng`` adds small jitter (position, size, colour) so faces are not identical."""
    from PIL import Image, ImageDraw

    _check_size(size)
    rng = rng or random.Random(0)
    s = size * _SCALE
    bg = BACKGROUNDS[attrs.background]
    canvas = Image.new("RGB", (s, s), bg)
    # The head is drawn on a transparent layer, then tilted as a whole for the pose.
    layer = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    cx = s / 2 + rng.uniform(-0.04, 0.04) * s
    cy = s / 2 + rng.uniform(-0.03, 0.03) * s
    rx = s * rng.uniform(0.30, 0.34)
    ry = s * rng.uniform(0.38, 0.42)
    tone = tuple(max(0, min(255, c + rng.randint(-8, 8))) for c in SKIN_TONES[attrs.skin_tone])
    dark = (30, 22, 18)
    d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=(*tone, 255), outline=(*dark, 255), width=max(2, s // 90))

    line = max(3, s // 28)  # thick strokes survive the 4x downsample
    eye_y = cy - ry * 0.22
    eye_dx = rx * 0.42
    eye_r = rx * 0.17
    for ex in (cx - eye_dx, cx + eye_dx):
        if attrs.eyes == "open":
            box = (ex - eye_r, eye_y - eye_r, ex + eye_r, eye_y + eye_r)
            d.ellipse(box, fill=(255, 255, 255, 255), outline=(*dark, 255), width=max(2, line // 2))
            pr = eye_r * 0.5
            d.ellipse((ex - pr, eye_y - pr, ex + pr, eye_y + pr), fill=(*dark, 255))
        else:
            d.line((ex - eye_r, eye_y, ex + eye_r, eye_y), fill=(*dark, 255), width=line)
    if attrs.glasses == "yes":
        g = eye_r * 1.55
        rim = (20, 20, 20, 255)
        for ex in (cx - eye_dx, cx + eye_dx):
            d.rectangle((ex - g, eye_y - g * 0.8, ex + g, eye_y + g * 0.8), outline=rim, width=line)
        d.line((cx - eye_dx + g, eye_y, cx + eye_dx - g, eye_y), fill=rim, width=line)
    # nose
    d.line((cx, cy - ry * 0.02, cx, cy + ry * 0.18), fill=(*dark, 255), width=max(2, line // 2))
    # mouth: a thick arc whose curvature is the expression label (corners ~7 px above/below the middle at 64 px)
    mw = rx * 0.62
    my = cy + ry * 0.5
    bend = ry * 0.30
    mouth = (150, 30, 40, 255)
    thick = max(4, s // 18)
    if attrs.expression == "neutral":
        d.line((cx - mw, my, cx + mw, my), fill=mouth, width=thick)
    elif attrs.expression == "smiling":  # lower part of an ellipse: corners up
        d.arc((cx - mw, my - bend * 1.6, cx + mw, my + bend * 0.4), 15, 165, fill=mouth, width=thick)
    else:  # frowning, upper part: corners down
        d.arc((cx - mw, my - bend * 0.4, cx + mw, my + bend * 1.6), 195, 345, fill=mouth, width=thick)

    angle = {"left": _TILT_DEGREES, "upright": 0, "right": -_TILT_DEGREES}[attrs.pose]
    if angle:
        layer = layer.rotate(angle + rng.uniform(-3, 3), resample=Image.Resampling.BICUBIC, center=(cx, cy))
    canvas.paste(layer, (0, 0), layer)
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


@dataclass
class SynthResult:
    out_dir: Path
    labels_csv: Path
    count: int
    counts: dict[str, dict[str, int]]


def _draw_chunk(job: tuple[str, int, list[tuple[str, str, int]]]) -> list[dict[str, str]]:
    """Draw and save one chunk of faces (runs in a worker process); return their label rows in order."""
    out, size, items = job
    rows = []
    for name, expression, face_seed in items:
        rng = random.Random(face_seed)
        attrs = random_attributes(rng, expression)
        draw_face(attrs, size, rng).save(Path(out) / name, format="PNG", optimize=False)
        rows.append({"file": name, **asdict(attrs)})
    return rows


def default_workers(n: int) -> int:
    """Processes worth using to draw ``n`` faces: the usable CPUs, at most 8, one per ~100 faces."""
    from .runtime import worker_processes

    return worker_processes(n, per_process=100)


def synth_faces(
    out_dir: str | Path,
    n: int,
    *,
    seed: int = 0,
    size: int = 64,
    overwrite: bool = False,
    workers: int = 1,
    reporter: Reporter = SILENT,
) -> SynthResult:
    """Write ``n`` faces as ``face_00000.png``... plus ``labels.csv`` (FairFace-style: ``file`` then attributes).

    Expressions are balanced (each appears n/3 times, in a seeded order) so
    chance accuracy on the expression task is 1/3 and a held-out split is fair.
    Each face has its own seed drawn from ``seed``, so the files are the same
    whatever the number of ``workers``. ``workers > 1`` draws in spawned
    processes (so a calling script needs the usual ``if __name__ == "__main__":``
    guard); ``default_workers(n)`` is what the CLI uses.
    """
    if n <= 0:
        raise FacellmError(f"--n must be at least 1, got {n}")
    _check_size(size)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder is not empty: {out} (choose another or pass --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    expressions = [EXPRESSIONS[i % len(EXPRESSIONS)] for i in range(n)]
    rng.shuffle(expressions)
    width = max(5, len(str(n - 1)))
    items = [(f"face_{i:0{width}d}.png", e, rng.getrandbits(64)) for i, e in enumerate(expressions)]
    workers = max(1, min(workers, n))
    chunk = max(1, -(-n // (workers * 4)))
    jobs = [(str(out), size, items[i : i + chunk]) for i in range(0, n, chunk)]
    chunks: list[list[dict[str, str]]] = []

    def collect(rows: list[dict[str, str]]) -> None:
        chunks.append(rows)
        reporter.advance(len(rows))

    reporter.stage("drawing faces", n)
    reporter.advance(0)
    if workers == 1:
        for j in jobs:
            collect(_draw_chunk(j))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: the caller may already hold OpenMP threads (torch), which a forked child can deadlock on
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for rows in pool.map(_draw_chunk, jobs):
                collect(rows)
    rows = [row for part in chunks for row in part]
    counts: dict[str, dict[str, int]] = {c: {} for c in LABEL_COLUMNS[1:]}
    for row in rows:
        for key in LABEL_COLUMNS[1:]:
            counts[key][row[key]] = counts[key].get(row[key], 0) + 1
    labels = out / "labels.csv"
    with open(labels, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(LABEL_COLUMNS), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return SynthResult(out_dir=out, labels_csv=labels, count=n, counts=counts)
