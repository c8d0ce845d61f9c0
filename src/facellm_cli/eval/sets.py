"""Multiple-choice sets from JSONL: build-dataset's ``mcq_*.jsonl`` export and users' own files.

Two line shapes are accepted, so people can bring their own questions:

* an :class:`MCQuestion` line (what build-dataset writes): ``id``, ``images``,
  ``question``, ``options``, ``answer`` letter, plus task/category/labels;
* a generic ``{"images": [...], "question": ..., "options": [...], "answer": ...}``
  line, where ``answer`` is a letter or the text of one option and ``id`` is
  optional (``<file stem>/<line>`` is used).

Relative image paths resolve against ``image_root`` (default: the image root
recorded in a build-dataset manifest, else the file's folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import DataError
from ..io import read_jsonl
from ..schema import LETTERS, MCQuestion
from .facexbench import check_images_exist


def _answer_letter(raw: Any, options: list[str], where: str) -> str:
    text = str(raw).strip()
    letters = LETTERS[: len(options)]
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    if len(text) == 3 and text[0] == "(" and text[2] == ")" and text[1].upper() in letters:
        return text[1].upper()
    hits = [i for i, o in enumerate(options) if o.strip() == text]
    if len(hits) == 1:
        return letters[hits[0]]
    raise DataError(
        f"{where}: answer {raw!r} is neither an option letter ({', '.join(letters)}) nor the text of exactly one option"
    )


def _resolve(images: list[str], root: Path) -> list[str]:
    return [img if Path(img).expanduser().is_absolute() else str(root / img) for img in images]


def _record(rec: dict[str, Any], stem: str, lineno: int, root: Path, where: str) -> MCQuestion:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object")
    missing = [k for k in ("question", "options", "answer") if k not in rec]
    if missing:
        raise DataError(f"{where}: missing {', '.join(missing)} (a line needs images, question, options, answer)")
    images = rec.get("images", rec.get("image", []))
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise DataError(f"{where}: images must be a list of paths")
    options = rec["options"]
    if not isinstance(options, list):
        raise DataError(f"{where}: options must be a list")
    options = [str(o) for o in options]
    if not 2 <= len(options) <= len(LETTERS):
        raise DataError(f"{where}: {len(options)} options; a question needs 2 to {len(LETTERS)}")
    data = dict(rec)
    data.update(
        id=str(rec.get("id") or f"{stem}/{lineno}"),
        images=_resolve(images, root),
        options=options,
        answer=_answer_letter(rec["answer"], options, where),
        task=str(rec.get("task") or stem),
    )
    try:
        return MCQuestion.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise DataError(f"{where}: {loc}: {first['msg']}") from None


def set_files(data: str | Path, split: str | None = None) -> list[Path]:
    """A JSONL file; for a folder its ``mcq_{split}.jsonl`` (default test; ``all``: every ``mcq_*.jsonl``).

    A folder without ``mcq_*`` files contributes every ``*.jsonl`` (users' own sets).
    """
    p = Path(data).expanduser()
    if p.is_file():
        if split:
            raise DataError(f"--split {split} picks a file of a build-dataset folder, but --data {p} is a file")
        return [p]
    if p.is_dir():
        mcq = sorted(p.glob("mcq_*.jsonl"))
        if mcq:
            if split == "all":
                return mcq
            wanted = p / f"mcq_{split or 'test'}.jsonl"
            if wanted.is_file():
                return [wanted]
            have = ", ".join(f.name for f in mcq)
            raise DataError(f"no {wanted.name} in {p} (it has {have}); choose another --split")
        files = sorted(p.glob("*.jsonl"))
        if files:
            return files
        raise DataError(
            f"no mcq_*.jsonl or *.jsonl files in {p} (point --data at a build-dataset output or a JSONL file)"
        )
    raise DataError(f"evaluation set not found: {p} (check the path given to --data)")


def load_jsonl_set(
    data: str | Path,
    *,
    image_root: str | Path | None = None,
    check_images: bool = True,
    split: str | None = None,
) -> list[MCQuestion]:
    """Questions from one JSONL file or a folder of them; ids must be unique; missing images are listed in one error.

    Relative image paths resolve against ``image_root``, else the image root a
    build-dataset manifest records, else the file's folder.
    """
    from ..data.manifest import default_image_root

    questions: list[MCQuestion] = []
    seen: dict[str, str] = {}
    for path in set_files(data, split):
        root = default_image_root(path, image_root) or path.parent
        for lineno, rec in read_jsonl(path):
            where = f"{path} line {lineno}"
            q = _record(rec, path.stem, lineno, root, where)
            if q.id in seen:
                raise DataError(f"{where}: id '{q.id}' already used at {seen[q.id]} (ids must be unique)")
            seen[q.id] = where
            questions.append(q)
    if not questions:
        raise DataError(f"no questions in {data}")
    if check_images:
        check_images_exist(questions)
    return questions
