"""The template strategy: deterministic answers from labels (``annotate.template``), no model, no network."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import ImageError
from ...images import open_image
from ...schema import Annotation
from ..run import Run, WorkImage, now_iso
from ..store import AnnotationWriter, done_pairs

if TYPE_CHECKING:
    from ..template import TemplateQA


def _todo(run: Run) -> tuple[list[tuple[WorkImage, list[TemplateQA]]], int]:
    """(image, its QA pairs not written yet) for every readable image, and how many images have no labels."""
    from ..template import template_qa

    done_ok = done_pairs(run.out)
    wanted = set(run.cfg.aspects) if run.cfg.aspects else None
    unlabelled = 0
    todo: list[tuple[WorkImage, list[TemplateQA]]] = []
    for w in run.plan.work:
        try:
            open_image(w.item.path)
        except ImageError as e:
            run.problems.skip(str(e))
            continue
        qas = [qa for qa in template_qa(w.item.labels, run.plan.prompt_set) if wanted is None or qa.aspect in wanted]
        if not qas:
            unlabelled += 1
        run.summary.items_total += len(qas)
        todo.append((w, [qa for qa in qas if (w.sha, qa.aspect) not in done_ok]))
    return todo, unlabelled


def run(run: Run) -> None:
    from ..template import TEMPLATE_VERSION

    run.summary.items_total = 0
    run.summary.prompt_version = TEMPLATE_VERSION
    todo, unlabelled = _todo(run)
    run.state.total = sum(len(qas) for _, qas in todo)
    with AnnotationWriter(run.out) as writer:
        for w, qas in todo:
            for qa in qas:
                writer.write(
                    Annotation(
                        image=w.item.name,
                        image_sha256=w.sha,
                        aspect=qa.aspect,
                        question=qa.question,
                        answer=qa.answer,
                        model="template",
                        provider="template",
                        prompt_version=TEMPLATE_VERSION,
                        labels=w.item.labels,
                        face=w.item.face,
                        attempts=1,
                        created=now_iso(),
                    )
                )
                run.summary.written_ok += 1
                run.state.done += 1
            run.report()
    run.summary.items_pending = run.summary.written_ok
    if unlabelled:
        run.problems.append(
            f"{unlabelled} image(s) have no usable labels, so the template provider wrote nothing for them "
            "(give --labels)"
        )
