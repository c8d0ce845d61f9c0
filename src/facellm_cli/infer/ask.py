"""``facellm ask``: answer one question about one or many images with a loaded model."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import AskConfig
from ..errors import FacellmError, ImageError
from ..images import find_images, open_image
from .engine import Engine, as_engine
from .generate import Prompt, check_max_new_tokens

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from ..faces import Face
    from ..models.loader import LoadedModel


@dataclass
class AskResult:
    image: str
    question: str
    answer: str | None
    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    error: str | None = None
    face: int | None = None  # with --faces: the face's index in its photo, its box and detector score
    box: list[int] | None = None
    score: float | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"image": self.image}
        if self.face is not None:
            out.update({"face": self.face, "box": self.box, "score": self.score})
        out.update(
            {
                "question": self.question,
                "answer": self.answer,
                "model": self.model,
                "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
                "seconds": round(self.seconds, 4),
            }
        )
        if self.error:
            out["error"] = self.error
        return out


def resolve_inputs(inputs: Sequence[str]) -> list[str]:
    """Paths, folders and globs -> image paths (``-`` kept for stdin). Errors if nothing matched."""
    paths = [str(p) for p in find_images(inputs)]
    if not paths:
        raise FacellmError(f"no images found in: {' '.join(inputs)} (give image files, folders or globs)")
    if paths.count("-") > 1:
        raise FacellmError("'-' (stdin) can be given only once")
    return paths


def _open(path: str, stdin_bytes: bytes | None) -> PILImage.Image:
    if path == "-":
        return open_image(stdin_bytes or b"", name="<stdin>")
    return open_image(path)


def ask_stream(
    lm: LoadedModel | Engine, cfg: AskConfig, image: str, question: str, stdin_bytes: bytes | None = None
) -> Iterator[str]:
    """Stream the answer for a single image (raises ImageError if it cannot be opened)."""
    check_max_new_tokens(lm, cfg.generation)
    img = _open(image, stdin_bytes)
    prompt = Prompt(images=[img], text=question, system=cfg.generation.system)
    yield from as_engine(lm).stream(prompt, cfg.generation)


def ask_many(
    lm: LoadedModel | Engine, cfg: AskConfig, images: Sequence[str], question: str, stdin_bytes: bytes | None = None
) -> Iterator[AskResult]:
    """Answer ``question`` for each image in batches; a bad image yields a result with ``error`` and is skipped."""
    check_max_new_tokens(lm, cfg.generation)
    engine = as_engine(lm)
    pending: list[tuple[str, PILImage.Image]] = []

    def flush() -> Iterator[AskResult]:
        if not pending:
            return
        t0 = time.perf_counter()
        prompts = [Prompt(images=[img], text=question, system=cfg.generation.system) for _, img in pending]
        gens = engine.generate(prompts, cfg.generation)
        per = (time.perf_counter() - t0) / len(pending)
        for (path, _), g in zip(pending, gens, strict=True):
            yield AskResult(path, question, g.text, engine.name, g.prompt_tokens, g.completion_tokens, per)
        pending.clear()

    for path in images:
        try:
            img = _open(path, stdin_bytes)
        except ImageError as e:
            yield AskResult(path if path != "-" else "<stdin>", question, None, engine.name, error=str(e))
            continue
        pending.append((path if path != "-" else "<stdin>", img))
        if len(pending) >= cfg.batch_size:
            yield from flush()
    yield from flush()


@dataclass
class PhotoFaces:
    """``ask --faces`` for one photo: an answer per face, or why there is none."""

    image: str
    results: list[AskResult]
    faces: list[Face]
    photo: PILImage.Image | None = None
    error: str | None = None  # unreadable photo, or no face found


def detect_photo(path: str, cfg: AskConfig, stdin_bytes: bytes | None = None) -> tuple[PILImage.Image, list[Face]]:
    """Open a photo and find its faces (raises ImageError for an unreadable photo)."""
    from ..faces import detect_config

    img = _open(path, stdin_bytes)
    return img, detect_config(img, cfg.face_crop, name=path).faces


def face_chip(img: PILImage.Image, face: Face, cfg: AskConfig) -> PILImage.Image:
    from ..faces import crop

    c = cfg.face_crop
    return crop(img, face, margin=c.margin, size=c.size, align=c.align)


def ask_face_stream(
    lm: LoadedModel | Engine, cfg: AskConfig, img: PILImage.Image, face: Face, question: str
) -> Iterator[str]:
    """Stream the answer about one face of a photo (its chip, as ``ask_faces`` crops it)."""
    check_max_new_tokens(lm, cfg.generation)
    prompt = Prompt(images=[face_chip(img, face, cfg)], text=question, system=cfg.generation.system)
    yield from as_engine(lm).stream(prompt, cfg.generation)


def ask_faces(
    lm: LoadedModel | Engine, cfg: AskConfig, images: Sequence[str], question: str, stdin_bytes: bytes | None = None
) -> Iterator[PhotoFaces]:
    """Detect the faces of each photo, crop each FairFace-style and answer ``question`` per face."""
    from ..faces import check_available

    check_available()
    check_max_new_tokens(lm, cfg.generation)
    engine = as_engine(lm)
    for path in images:
        name = path if path != "-" else "<stdin>"
        try:
            img, faces = detect_photo(path, cfg, stdin_bytes)
        except ImageError as e:
            yield PhotoFaces(name, [], [], error=str(e))
            continue
        if not faces:
            yield PhotoFaces(name, [], [], photo=img, error=f"no face found: {name}")
            continue
        results: list[AskResult] = []
        for start in range(0, len(faces), cfg.batch_size):
            batch = faces[start : start + cfg.batch_size]
            t0 = time.perf_counter()
            prompts = [
                Prompt(images=[face_chip(img, f, cfg)], text=question, system=cfg.generation.system) for f in batch
            ]
            gens = engine.generate(prompts, cfg.generation)
            per = (time.perf_counter() - t0) / len(batch)
            for i, (f, g) in enumerate(zip(batch, gens, strict=True), start):
                results.append(
                    AskResult(
                        name,
                        question,
                        g.text,
                        engine.name,
                        g.prompt_tokens,
                        g.completion_tokens,
                        per,
                        face=i,
                        box=f.int_box(),
                        score=round(f.score, 4),
                    )
                )
        yield PhotoFaces(name, results, faces, photo=img)
