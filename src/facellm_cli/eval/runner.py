"""Run a multiple-choice evaluation: load questions, answer the ones not yet cached, report.

Three ways to answer, one prediction format:

* ``generate`` — batched greedy generation through :func:`infer.generate.generate_batch`,
  then :func:`scoring.parse_answer`;
* ``likelihood`` — one forward pass per batch; the option whose letter token
  ("A" or " A") the model scores highest after the prompt is the answer, so
  nothing needs parsing;
* endpoint — any OpenAI-compatible server through the shared
  :class:`facellm_cli.endpoint.client.ChatClient` (bounded concurrency, retries
  on 429/5xx/timeouts honouring Retry-After).

Every answered question is appended to ``predictions.jsonl`` at once, so an
interrupted run resumes where it stopped; the lines carry a fingerprint of the
setup (model, mode, prompt setting) so answers from another setup are never
mixed in.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import EvalConfig, config_to_dict, dump_config
from ..errors import ConfigError, EndpointError, OutputExistsError
from ..images import open_image
from ..infer.engine import Engine, as_engine, letter_token_ids
from ..infer.generate import Prompt
from ..io import JsonlAppender, atomic_write_json, read_jsonl
from ..reporting import SILENT, Reporter
from ..schema import LETTERS, MCQuestion, format_mcq_prompt
from .facexbench import CATEGORY_NAMES, check_images_exist, find_benchmark_dir, load_facexbench
from .scoring import parse_answer
from .sets import load_jsonl_set

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from ..models.loader import LoadedModel

PREDICTIONS = "predictions.jsonl"


# ---------------------------------------------------------------- questions


def load_questions(cfg: EvalConfig) -> list[MCQuestion]:
    """All questions of the configured set, before --tasks/--limit; images are not checked here."""
    if cfg.benchmark == "facexbench":
        return load_facexbench(cfg.data_dir or "", check_images=False)
    return load_jsonl_set(cfg.data or "", image_root=cfg.image_root, split=cfg.split, check_images=False)


def _task_names(q: MCQuestion) -> tuple[str, ...]:
    return tuple(n for n in (q.task, q.subtask or "", q.category, CATEGORY_NAMES.get(q.category, "")) if n)


def stratified_sample(questions: Sequence[MCQuestion], n: int, seed: int) -> list[MCQuestion]:
    """``n`` questions drawn with ``seed``, each task keeping its share (largest remainder), in the set's order.

    The first N in file order would be one or two datasets of a benchmark
    sorted by file name; a per-task sample keeps a small run representative.
    """
    import random

    if n >= len(questions):
        return list(questions)
    by_task: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_task.setdefault(q.task, []).append(i)
    total = len(questions)
    quotas = {t: n * len(idx) / total for t, idx in by_task.items()}
    take = {t: int(v) for t, v in quotas.items()}
    left = n - sum(take.values())
    for t in sorted(quotas, key=lambda t: (-(quotas[t] - take[t]), t))[:left]:
        take[t] += 1
    rng = random.Random(seed)
    chosen: list[int] = []
    for t in sorted(by_task):
        chosen.extend(rng.sample(by_task[t], take[t]))
    return [questions[i] for i in sorted(chosen)]


def select_questions(
    questions: Sequence[MCQuestion], tasks: Sequence[str] | None, limit: int | None, seed: int = 0
) -> list[MCQuestion]:
    """Questions whose task, sub-task or category (key or display name) is in ``tasks``; then a seeded,
    task-stratified sample of ``limit``. Unknown task names are an error listing the valid ones."""
    chosen = list(questions)
    if tasks:
        wanted = {t.strip().lower() for t in tasks if t.strip()}
        known: set[str] = set()
        for q in questions:
            known.update(n.lower() for n in _task_names(q))
        unknown = sorted(wanted - known)
        if unknown:
            names = sorted({q.task for q in questions})
            subs = sorted({q.subtask for q in questions if q.subtask})
            cats = sorted({CATEGORY_NAMES.get(q.category, q.category) for q in questions})
            raise ConfigError(
                f"tasks: {', '.join(unknown)} not in this set; valid tasks: {', '.join(names)}"
                + (f"; sub-tasks: {', '.join(subs)}" if subs else "")
                + f"; categories: {', '.join(cats)}"
            )
        chosen = [q for q in chosen if any(n.lower() in wanted for n in _task_names(q))]
    return stratified_sample(chosen, limit, seed) if limit else chosen


def describe_selection(total: int, chosen: int, cfg: EvalConfig) -> str | None:
    """How the questions were chosen, for the report (None when the whole set was run)."""
    parts = []
    if cfg.tasks:
        parts.append(f"tasks {', '.join(cfg.tasks)}")
    if cfg.limit and cfg.limit < total:
        parts.append(f"a random sample of {chosen} (seed {cfg.sample_seed}, stratified over tasks)")
    return f"{chosen} of {total} questions: " + "; ".join(parts) if parts else None


# ---------------------------------------------------------------- answering backends


@dataclass
class Answer:
    """One model answer: the raw text (generate/endpoint) or the option scores (likelihood)."""

    raw: str | None = None
    scores: list[float] | None = None


def _open_all(q: MCQuestion) -> list[PILImage.Image]:
    return [open_image(p) for p in q.images]


class LocalBackend:
    """generate / likelihood answers from a loaded model or engine, a batch at a time."""

    def __init__(self, lm: LoadedModel | Engine, cfg: EvalConfig) -> None:
        self.engine = as_engine(lm)
        self.cfg = cfg
        self.calls = 0  # forward passes / generate calls made (tests and the benchmark count them)
        if cfg.mode == "likelihood":
            letter_token_ids(self.engine.tokenizer)  # a tokenizer that cannot tell letters apart fails before any work

    def prompt_text(self, q: MCQuestion) -> str:
        return format_mcq_prompt(q, with_task_description=self.cfg.with_task_description)

    def answer(self, batch: Sequence[MCQuestion]) -> list[Answer]:
        if self.cfg.mode == "likelihood":
            return [Answer(scores=s) for s in self.score(batch)]
        self.calls += 1
        return [Answer(raw=g.text) for g in self.engine.generate(self.prompts(batch), self.cfg.generation)]

    def prompts(self, batch: Sequence[MCQuestion]) -> list[Prompt]:
        return [Prompt(images=_open_all(q), text=self.prompt_text(q), system=self.cfg.generation.system) for q in batch]

    def score(self, batch: Sequence[MCQuestion]) -> list[list[float]]:
        """Log-probability of each option letter as the first answer token (one engine call for the batch)."""
        self.calls += 1
        return self.engine.score_letters(self.prompts(batch), [len(q.options) for q in batch])


class EndpointBackend:
    """Answers from an OpenAI-compatible chat endpoint through the shared :class:`ChatClient`.

    ``concurrency`` questions in flight; 429/5xx/timeouts are retried by the client
    (honouring Retry-After); a malformed answer is asked again up to ``max_retries`` times.
    """

    def __init__(self, cfg: EvalConfig, api_key: str | None) -> None:
        from ..endpoint.client import ChatClient

        assert cfg.endpoint is not None
        self.cfg = cfg
        self.ep = cfg.endpoint
        gen = cfg.generation
        self.client = ChatClient(self.ep, api_key, max_tokens=gen.max_new_tokens, temperature=gen.temperature)

    @property
    def calls(self) -> int:
        """HTTP requests made, retries included."""
        return self.client.stats.requests

    def messages(self, q: MCQuestion) -> list[dict[str, Any]]:
        from ..endpoint.messages import chat_messages
        from ..images import encode_for_request

        images = [encode_for_request(p, self.ep.max_image_side).data_uri for p in q.images]
        text = format_mcq_prompt(q, with_task_description=self.cfg.with_task_description)
        return chat_messages(self.cfg.generation.system, text, images, images_first=True)

    def _failed(self, q: MCQuestion, e: Any) -> EndpointError:
        from ..endpoint.client import RETRY_STATUS

        base = self.ep.base_url
        if e.attempts == 1 and e.status is not None and e.status < 500 and e.status not in RETRY_STATUS:
            return EndpointError(f"endpoint {base} refused question {q.id}: {e}")
        return EndpointError(
            f"endpoint {base} failed question {q.id} after {e.attempts} attempts ({e.reason}); "
            "answers so far are saved; rerun the same command to resume"
        )

    async def ask(self, q: MCQuestion) -> Answer:
        import asyncio

        from ..endpoint.client import RequestFailed

        msgs = await asyncio.to_thread(self.messages, q)
        malformed = ""
        for _ in range(self.ep.max_retries + 1):
            try:
                result = await self.client.chat(msgs)
            except RequestFailed as e:
                raise self._failed(q, e) from None
            if result.malformed is None:
                return Answer(raw=result.text or "")
            malformed = result.malformed
        raise EndpointError(
            f"endpoint {self.ep.base_url} failed question {q.id} after {self.ep.max_retries + 1} attempts "
            f"(malformed response: {malformed}); answers so far are saved; rerun the same command to resume"
        )

    def run(self, questions: Sequence[MCQuestion]) -> Iterator[tuple[MCQuestion, Answer]]:
        """Yield (question, answer) as they complete, never more than ``concurrency`` in flight."""
        from ..endpoint.client import as_completed, iterate_sync

        return iterate_sync(self.client, as_completed(questions, self.ask, self.ep.concurrency))


# ---------------------------------------------------------------- run


def setup_spec(cfg: EvalConfig) -> dict[str, Any]:
    """What determines an answer; predictions made under another spec are not reused."""
    if cfg.endpoint is not None:
        who: dict[str, Any] = {"endpoint": cfg.endpoint.base_url, "model": cfg.endpoint.model}
    else:
        m = cfg.model
        who = {k: getattr(m, k) for k in ("model", "subfolder", "revision", "adapter", "quantization", "dtype")}
        if m.engine != "transformers":  # keyed only when not the default, so earlier runs' caches stay valid
            who["engine"] = m.engine
    spec: dict[str, Any] = {**who, "mode": cfg.mode, "with_task_description": cfg.with_task_description}
    if cfg.mode == "generate":
        g = cfg.generation
        spec.update(
            max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p, system=g.system, seed=g.seed
        )
    return spec


def spec_fingerprint(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def read_cached(path: Path, fingerprint: str, spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Predictions already in ``path`` for this setup; errors if the file holds another setup's."""
    cached: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return cached
    from ..io import repair_jsonl_tail

    repair_jsonl_tail(path)
    for lineno, rec in read_jsonl(path):
        if rec.get("fingerprint") != fingerprint:
            old = rec.get("setup") or {}
            changed = sorted(k for k in set(spec) | set(old) if spec.get(k) != old.get(k)) or ["setup"]
            raise OutputExistsError(
                f"{path} line {lineno} was answered with a different setup (changed: {', '.join(changed)}); "
                "use another --out, or delete that file to start over"
            )
        cached[str(rec["id"])] = rec
    return cached


def prediction_record(q: MCQuestion, ans: Answer, fingerprint: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The line written to predictions.jsonl for one answered question."""
    letter: str | None
    if ans.scores is not None:
        scores = ans.scores
        best = max(range(len(scores)), key=lambda i: scores[i])
        letter, how = LETTERS[best], "likelihood"
    else:
        parsed = parse_answer(ans.raw, q.options)
        letter, how = parsed.letter, parsed.how
    return {
        "id": q.id,
        "task": q.task,
        "subtask": q.subtask,
        "category": q.category,
        "setting": q.setting,
        "num_images": len(q.images),
        "labels": q.labels,
        "options": q.options,
        "gold": q.answer,
        "prediction": letter,
        "how": how,
        "correct": letter == q.answer,
        "raw": ans.raw,
        "scores": [round(s, 5) for s in ans.scores] if ans.scores is not None else None,
        "fingerprint": fingerprint,
        "setup": spec,
    }


def rescore(rec: dict[str, Any]) -> dict[str, Any]:
    """Re-parse a cached generated answer with the current parser (cheap; keeps old runs comparable)."""
    if rec.get("raw") is None or rec.get("scores") is not None:
        return rec
    parsed = parse_answer(rec["raw"], rec.get("options") or [])
    return {**rec, "prediction": parsed.letter, "how": parsed.how, "correct": parsed.letter == rec.get("gold")}


@dataclass
class EvalOutcome:
    """What a run did and where its files are."""

    out_dir: Path
    results: dict[str, Any]
    asked: int
    cached: int
    files: dict[str, str] = field(default_factory=dict)
    model_calls: int = 0


def _cost(q: MCQuestion) -> tuple[int, int]:
    """Sort key grouping questions of similar prompt size: image count, then text length."""
    return (len(q.images), len(q.context or "") + len(q.question) + sum(len(o) for o in q.options))


def _batches(items: Sequence[MCQuestion], size: int) -> Iterator[list[MCQuestion]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def evaluate(
    cfg: EvalConfig,
    *,
    api_key: str | None = None,
    lm: LoadedModel | Engine | None = None,
    reporter: Reporter = SILENT,
) -> EvalOutcome:
    """Evaluate as ``cfg`` says and write predictions, config, results.json, report.md and the chart to ``cfg.out``.

    Questions are loaded and their images checked before any model loads; a
    model (``lm``, else the one ``cfg.model`` names) is loaded only when some
    question is not answered yet.
    """
    from .report import build_results, write_reports

    if cfg.train_data:
        from ..data.overlap import check_train_data

        check_train_data(cfg)
    everything = load_questions(cfg)
    questions = select_questions(everything, cfg.tasks, cfg.limit, cfg.sample_seed)
    if not questions:
        raise ConfigError("tasks: no questions selected (check --tasks and --limit)")
    # Only the selected questions' images must exist (a --limit run needs no full download).
    check_images_exist(questions, find_benchmark_dir(cfg.data_dir or "") if cfg.benchmark else None)
    out = default_out_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    spec = setup_spec(cfg)
    fp = spec_fingerprint(spec)
    pred_path = out / PREDICTIONS
    cached = read_cached(pred_path, fp, spec)
    # Similar lengths batch together (a 6k-token tools prompt would pad a whole batch of short ones);
    # answers are keyed by id, so the order does not matter for resuming or reporting.
    todo = sorted((q for q in questions if q.id not in cached), key=_cost)
    total = len(questions)
    if todo and cfg.endpoint is None and lm is None:
        from ..infer.engine import load_engine

        lm = load_engine(cfg.model, reporter)
    reporter.stage("answering questions", total)
    reporter.advance(total - len(todo))
    calls = _answer(cfg, todo, lm, api_key, pred_path, (fp, spec), cached, reporter) if todo else 0
    records = [rescore(cached[q.id]) for q in questions]
    results = build_results(records, _meta(cfg, spec, len(everything), total, len(todo)))
    if cfg.train_data:
        from ..data.overlap import add_unseen_split

        add_unseen_split(results, records, questions, cfg)
    files = write_reports(results, out)
    files["predictions"] = str(pred_path)
    files["config"] = str(out / "config.yaml")
    atomic_write_json(out / "run.json", {"setup": spec, "fingerprint": fp, "config": config_to_dict(cfg)})
    return EvalOutcome(out, results, asked=len(todo), cached=total - len(todo), files=files, model_calls=calls)


def _answer(
    cfg: EvalConfig,
    todo: list[MCQuestion],
    lm: LoadedModel | Engine | None,
    api_key: str | None,
    pred_path: Path,
    setup: tuple[str, dict[str, Any]],
    cached: dict[str, dict[str, Any]],
    reporter: Reporter,
) -> int:
    """Answer ``todo`` (by the endpoint, else by ``lm`` in batches), appending each prediction as it comes.

    Returns the number of model calls."""
    fp, spec = setup
    backend: EndpointBackend | LocalBackend
    if cfg.endpoint is not None:
        backend = EndpointBackend(cfg, api_key)
        answered: Iterator[list[tuple[MCQuestion, Any]]] = ([pair] for pair in backend.run(todo))
    else:
        assert lm is not None  # loaded by evaluate
        local = backend = LocalBackend(lm, cfg)
        answered = (list(zip(b, local.answer(b), strict=True)) for b in _batches(todo, cfg.batch_size))
    with JsonlAppender(pred_path) as sink:
        for pairs in answered:
            for q, ans in pairs:
                rec = prediction_record(q, ans, fp, spec)
                sink.write(rec)
                cached[q.id] = rec
            reporter.advance(len(pairs))
    return backend.calls


def _meta(cfg: EvalConfig, spec: dict[str, Any], available: int, total: int, asked: int) -> dict[str, Any]:
    """What results.json records about the run besides the scores."""
    return {
        "model": spec.get("model"),
        "model_name": model_name(cfg),
        "endpoint": spec.get("endpoint"),
        "adapter": spec.get("adapter"),
        "engine": spec.get("engine", "transformers") if cfg.endpoint is None else None,
        "mode": cfg.mode,
        "with_task_description": cfg.with_task_description,
        "set": cfg.benchmark or cfg.data,
        "set_name": set_name(cfg),
        "split": data_split(cfg),
        "selection": describe_selection(available, total, cfg),
        "questions": total,
        "answered_this_run": asked,
        "reused_from_cache": total - asked,
    }


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.") or "x"


def model_name(cfg: EvalConfig) -> str:
    """A short name for the model under test: the folder or hub name, plus the adapter's folder name."""
    if cfg.endpoint is not None:
        return cfg.endpoint.model
    name = Path(cfg.model.model.rstrip("/")).name or cfg.model.model
    if cfg.model.adapter:
        name += "+" + (Path(cfg.model.adapter.rstrip("/")).name or "adapter")
    return name


def data_split(cfg: EvalConfig) -> str | None:
    """The build-dataset split scored when --data is a folder of mcq_<split>.jsonl files, else None."""
    if not cfg.data:
        return None
    p = Path(cfg.data).expanduser()
    if p.is_dir() and any(p.glob("mcq_*.jsonl")):
        return cfg.split or "test"
    return None


def set_name(cfg: EvalConfig) -> str:
    """A short name for the question set: facexbench, or the data folder/file name (with its split)."""
    if cfg.benchmark:
        return cfg.benchmark
    from ..data.manifest import find_manifest

    p = Path((cfg.data or "set").rstrip("/"))
    split = data_split(cfg)
    if split:
        return f"{p.name}-{split}"
    m = re.fullmatch(r"mcq_(\w+)", p.stem)
    if m and p.is_file() and find_manifest(p) is not None:  # one split file of a build-dataset folder
        return f"{p.parent.name}-{m.group(1)}"
    return p.stem


def default_out_dir(cfg: EvalConfig) -> Path:
    """``cfg.out``, else ``eval-<model>-<set>``: a second model gets its own folder, not a setup clash."""
    if cfg.out:
        return Path(cfg.out).expanduser()
    return Path(f"eval-{_slug(model_name(cfg))}-{_slug(set_name(cfg))}")
