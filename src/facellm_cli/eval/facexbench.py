"""FaceXBench loader: a checkout's ``benchmark/`` folder -> :class:`MCQuestion` records.

FaceXBench (arXiv 2501.10360, repository Kartik-3004/facexbench) ships 48 JSON
files, one per (dataset, setting), 5,000 questions in all. Each file carries
its category, sub-category, image setting, task description (``prepend_text``),
answer instruction (``postpend_text``) and, for the tools questions, a
``context``. Image paths are relative to the ``benchmark/`` folder (the
reference evaluator prefixes them with ``./facexbench/benchmark/``), including
the few ``data/...`` ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..schema import LETTERS, MCQuestion

# Category keys of the files -> names used in the FaceXBench / FaceLLM tables, in table order.
CATEGORY_NAMES: dict[str, str] = {
    "bias_fairness": "Bias & Fairness",
    "face_recognition": "Face Recognition",
    "fas_deepfakes": "Face Authentication",
    "attributes_expression": "Face Analysis",
    "face_localization": "Face Localization",
    "tools_use": "Face Tools Use",
}

# Sub-tasks whose single-image questions name the person's true group in their answer.
DEMOGRAPHIC_SUBTASKS = ("gender", "age", "race")
_NOT_A_GROUP = {"none of the above", "both", "all of the above"}


def category_display(key: str) -> str:
    """Display name of a category key; unknown keys are shown as given."""
    return CATEGORY_NAMES.get(key, key)


def find_benchmark_dir(data_dir: str | Path) -> Path:
    """The folder holding the question JSON files: ``DIR/benchmark`` for a checkout, else ``DIR`` itself."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(
            f"FaceXBench folder not found: {root} (clone github.com/Kartik-3004/facexbench and pass --data-dir)"
        )
    for cand in (root / "benchmark", root):
        if cand.is_dir() and any(cand.glob("*.json")):
            return cand
    raise DataError(
        f"no FaceXBench question files (*.json) in {root} or {root / 'benchmark'} "
        "(pass the repository checkout or its benchmark/ folder to --data-dir)"
    )


def _labels(meta: dict[str, Any], q: dict[str, Any]) -> dict[str, str]:
    """Demographic label of the person in a single-image bias question, read from its correct answer."""
    sub = meta.get("sub-category")
    if meta.get("category") != "bias_fairness" or sub not in DEMOGRAPHIC_SUBTASKS or len(q["image_paths"]) != 1:
        return {}
    answer = str(q.get("answer", "")).strip()
    if not answer or answer.lower() in _NOT_A_GROUP:
        return {}
    return {str(sub): answer}


def _question(stem: str, n: str, meta: dict[str, Any], q: dict[str, Any], bench: Path, where: str) -> MCQuestion:
    try:
        options = [str(o) for o in q["options"]]
        letter = str(q["correct_answer_option"]).strip().upper()
        paths = q["image_paths"]
        text = q["question_text"]
    except (KeyError, TypeError) as e:
        raise DataError(
            f"{where}: question missing field {e} (expected image_paths, question_text, options, correct_answer_option)"
        ) from None
    if not 2 <= len(options) <= len(LETTERS):
        raise DataError(f"{where}: {len(options)} options; a question needs 2 to {len(LETTERS)}")
    if letter not in LETTERS[: len(options)]:
        raise DataError(f"{where}: correct_answer_option '{letter}' is not one of {', '.join(LETTERS[: len(options)])}")
    setting = meta.get("num_images")
    return MCQuestion(
        id=f"{stem}/{n}",
        images=[str(bench / p) for p in paths],
        question=str(text),
        options=options,
        answer=letter,
        task=stem,
        category=str(meta.get("category", "default")),
        subtask=meta.get("sub-category"),
        image_setting=setting if setting in ("zero", "single", "multiple") else None,
        context=meta.get("context"),
        prepend_text=meta.get("prepend_text"),
        postpend_text=meta.get("postpend_text"),
        labels=_labels(meta, q),
    )


def load_facexbench(data_dir: str | Path, *, check_images: bool = True) -> list[MCQuestion]:
    """All questions of a FaceXBench checkout, in file-name then question-number order.

    With ``check_images`` every listed image must exist; the missing ones are
    listed in one DataError before any model is loaded.
    """
    bench = find_benchmark_dir(data_dir)
    questions: list[MCQuestion] = []
    for path in sorted(bench.glob("*.json")):
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("questions"), dict):
            continue  # not a question file (FaceXBench keeps other JSON next to them only in results folders)
        for n, q in sorted(meta["questions"].items(), key=lambda kv: (len(kv[0]), kv[0])):
            questions.append(_question(path.stem, n, meta, q, bench, f"{path.name} question {n}"))
    if not questions:
        raise DataError(f"no FaceXBench questions found in {bench}")
    if check_images:
        check_images_exist(questions, bench)
    return questions


def check_images_exist(questions: Iterable[MCQuestion], root: Path | None = None, show: int = 10) -> None:
    """Raise one DataError that lists the missing images (the first ``show`` and a count)."""
    missing: list[str] = []
    seen: set[str] = set()
    for q in questions:
        for img in q.images:
            if img not in seen:
                seen.add(img)
                if not Path(img).is_file():
                    missing.append(img)
    if not missing:
        return
    shown = ", ".join(_rel(m, root) for m in missing[:show])
    more = f" and {len(missing) - show} more" if len(missing) > show else ""
    where = f" under {root}" if root else ""
    raise DataError(
        f"{len(missing)} image(s) listed by the questions are missing{where}: {shown}{more} "
        "(download the benchmark images, or fix the image root)"
    )


def _rel(path: str, root: Path | None) -> str:
    if root is None:
        return path
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path
