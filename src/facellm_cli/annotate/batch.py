"""``--batch``: the same job through the OpenAI Batch API (half price, up to 24 h per batch).

Request files are written under ``<out>.batch/`` and split so each stays under
the API limits (``batch_max_requests`` lines, ``batch_max_bytes`` bytes). Each
part is uploaded (``/v1/files``), submitted (``/v1/batches``) and polled; when a
batch completes its output is merged into the same JSONL as live runs write,
with the same answer checks. ``state.json`` records every file and batch id as
soon as the API returns it, so re-running the same command after an interruption
polls the batches already submitted instead of paying for them twice.

Refused, empty or malformed answers (and requests the batch failed) go into a
new round, up to ``max_reasks`` extra rounds; what is still unanswered after that
is written as ``failed`` records to the failures sidecar, which a later run retries.

The few control calls (upload, create, retrieve, download) use the SDK's own
retries: they are rare, sequential and not latency-bound, unlike the live path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import AnnotateConfig
from ..errors import EndpointError, ImageError
from ..io import atomic_write_json
from ..schema import Annotation, Usage
from .client import chat_request, classify_answer
from .labels import Problems
from .pipeline import (
    AnnotateSummary,
    AnnotationWriter,
    Plan,
    ProgressState,
    build_messages,
    done_pairs,
    encode_image,
    now_iso,
    parse_grouped,
)
from .prompts import AspectTemplate, grouped_json_schema, render_aspect, render_grouped

TERMINAL = {"completed", "failed", "expired", "cancelled"}
ENDPOINT = "/v1/chat/completions"


@dataclass
class BatchPart:
    path: str
    requests: int
    bytes: int
    file_id: str | None = None
    batch_id: str | None = None
    status: str = "written"
    merged: bool = False


@dataclass
class BatchState:
    round: int = 0
    model: str = ""
    mode: str = ""
    parts: list[BatchPart] = field(default_factory=list)
    manifest: str = ""

    @classmethod
    def load(cls, path: Path) -> BatchState | None:
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            round=data["round"],
            model=data["model"],
            mode=data["mode"],
            parts=[BatchPart(**p) for p in data["parts"]],
            manifest=data["manifest"],
        )

    def save(self, path: Path) -> None:
        atomic_write_json(path, asdict(self))

    @property
    def active(self) -> bool:
        return any(not p.merged for p in self.parts)


def batch_dir_for(cfg: AnnotateConfig, out: Path) -> Path:
    return Path(cfg.batch_dir) if cfg.batch_dir else out.with_name(out.stem + ".batch")


def _request_body(cfg: AnnotateConfig, messages: list[dict[str, Any]], rf: dict[str, Any] | None) -> dict[str, Any]:
    return chat_request(cfg.model, messages, cfg.max_tokens, cfg.temperature, rf)


def write_round(
    cfg: AnnotateConfig,
    plan: Plan,
    todo: dict[str, list[AspectTemplate]],
    bdir: Path,
    round_no: int,
    problems: Problems,
    left_out: set[str],
) -> BatchState:
    """Write the request files (split under the limits) and the manifest for one round.

    Images that cannot be sent (unreadable, or a request over the size limit) are reported
    once and added to ``left_out``, which later rounds skip.
    """
    bdir.mkdir(parents=True, exist_ok=True)
    ps = plan.prompt_set
    by_sha = {w.sha: w for w in plan.work}
    state = BatchState(round=round_no, model=cfg.model, mode=cfg.mode, manifest=f"round{round_no}_manifest.jsonl")
    manifest = open(bdir / state.manifest, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    current: Any = None
    count = size = 0

    def close_part() -> None:
        nonlocal current
        if current is not None:
            current.close()
            state.parts[-1].requests, state.parts[-1].bytes = count, size
            current = None

    def emit(custom_id: str, body: dict[str, Any], entry: dict[str, Any]) -> None:
        nonlocal current, count, size
        line = (json.dumps({"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}) + "\n").encode()
        if len(line) > cfg.batch_max_bytes:
            if entry["sha"] not in left_out:
                left_out.add(entry["sha"])
                problems.skip(f"request for {entry['image']} is {len(line):,} bytes, over batch_max_bytes; skipped")
            return
        if current is not None and (count + 1 > cfg.batch_max_requests or size + len(line) > cfg.batch_max_bytes):
            close_part()
        if current is None:
            path = bdir / f"round{round_no}_part{len(state.parts) + 1}.jsonl"
            state.parts.append(BatchPart(path=path.name, requests=0, bytes=0))
            current = open(path, "wb")  # noqa: SIM115 - closed in close_part
            count = size = 0
        current.write(line)
        count += 1
        size += len(line)
        manifest.write(json.dumps({"custom_id": custom_id, "part": state.parts[-1].path, **entry}) + "\n")

    try:
        for sha, aspects in todo.items():
            if sha in left_out:
                continue
            w = by_sha[sha]
            try:
                image = encode_image(w.item.path, cfg.max_image_side, cfg.image_detail)
            except ImageError as e:
                left_out.add(sha)
                problems.skip(str(e))
                continue
            entry = {"image": w.item.name, "sha": sha, "labels": w.item.labels, "tokens": image.tokens}
            if w.item.face is not None:
                entry["face"] = w.item.face.model_dump(mode="json")
            if cfg.mode == "per-aspect":
                for a in aspects:
                    prompt, _ = render_aspect(ps, a, w.item.labels)
                    messages = build_messages(ps.system, prompt, image, cfg.image_detail)
                    emit(f"{sha}:{a.key}", _request_body(cfg, messages, None), {**entry, "aspects": [a.key]})
            else:
                text = render_grouped(ps, aspects, w.item.labels)
                messages = build_messages(ps.system, text, image, cfg.image_detail)
                rf = grouped_json_schema(aspects) if cfg.structured_output != "text" else None
                emit(f"{sha}:*", _request_body(cfg, messages, rf), {**entry, "aspects": [a.key for a in aspects]})
    finally:
        close_part()
        manifest.close()
    return state


def _pending(plan: Plan, out: Path) -> dict[str, list[AspectTemplate]]:
    done_ok = done_pairs(out)
    todo: dict[str, list[AspectTemplate]] = {}
    for w in plan.work:
        left = [a for a in w.pending if (w.sha, a.key) not in done_ok]
        if left:
            todo[w.sha] = left
    return todo


def run_batch(
    cfg: AnnotateConfig,
    out: Path,
    plan: Plan,
    summary: AnnotateSummary,
    state: ProgressState,
    problems: Problems,
    *,
    api_key: str,
    on_progress: Callable[[ProgressState], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Submit, poll and merge rounds of batches until everything is answered or the re-asks run out."""
    import openai

    bdir = batch_dir_for(cfg, out)
    state_path = bdir / "state.json"
    client = openai.OpenAI(api_key=api_key, base_url=cfg.base_url, max_retries=cfg.max_retries, timeout=cfg.timeout_s)
    aspects_by_key = {a.key: a for a in plan.prompt_set.aspects}
    reasons: dict[tuple[str, str], str] = {}
    entries_seen: dict[tuple[str, str], dict[str, Any]] = {}
    left_out: set[str] = set()  # images that cannot be sent: reported once, not retried
    state.phase = "batch"
    rounds = 0  # rounds started or resumed by this invocation; a later run starts counting again
    try:
        while True:
            bstate = BatchState.load(state_path)
            if bstate is None or not bstate.active:
                todo = {sha: left for sha, left in _pending(plan, out).items() if sha not in left_out}
                next_round = (bstate.round + 1) if bstate else 1
                if not todo or rounds >= cfg.max_reasks + 1:
                    break
                state.total = max(state.total, state.done + sum(len(v) for v in todo.values()))
                bstate = write_round(cfg, plan, todo, bdir, next_round, problems, left_out)
                bstate.save(state_path)
                if not bstate.parts:
                    break
            rounds += 1
            before = summary.requests
            _submit(client, bstate, bdir, state_path, summary)
            if rounds > 1:  # rounds after the first re-ask what was refused or failed
                summary.reasks += summary.requests - before
            _poll(client, cfg, bstate, state_path, sleep)
            with AnnotationWriter(out) as writer:
                for part in bstate.parts:
                    if not part.merged:
                        _merge(
                            client,
                            cfg,
                            plan,
                            bstate,
                            part,
                            bdir,
                            out,
                            writer,
                            reasons,
                            entries_seen,
                            summary,
                            state,
                            problems,
                        )
                        part.merged = True
                        bstate.save(state_path)
                        if on_progress:
                            on_progress(state)
        # What is still unanswered after the last round is recorded as failed (a later run retries it).
        done_ok = done_pairs(out)
        with AnnotationWriter(out) as writer:
            for (sha, key), reason in reasons.items():
                if (sha, key) in done_ok or key not in aspects_by_key:
                    continue
                e = entries_seen[(sha, key)]
                a = aspects_by_key[key]
                writer.write(_record(cfg, plan, e, a, "", ok=False, error=reason, usage=(0, 0), attempts=1))
                summary.failed += 1
                state.failed += 1
    except openai.AuthenticationError as e:
        raise EndpointError(
            f"endpoint rejected the API key ({e.status_code}); check the variable named by --api-key-env"
        ) from None
    except openai.APIConnectionError as e:
        raise EndpointError(
            f"cannot reach the batch endpoint {cfg.base_url or 'api.openai.com'} ({e}); re-run to resume"
        ) from None
    except openai.APIStatusError as e:
        raise EndpointError(f"batch API call failed: HTTP {e.status_code} ({e.message}); re-run to resume") from None
    finally:
        client.close()


def _submit(client: Any, bstate: BatchState, bdir: Path, state_path: Path, summary: AnnotateSummary) -> None:
    for part in bstate.parts:
        if part.file_id is None:
            with open(bdir / part.path, "rb") as f:
                part.file_id = client.files.create(file=(part.path, f), purpose="batch").id
            bstate.save(state_path)
        if part.batch_id is None:
            batch = client.batches.create(
                input_file_id=part.file_id,
                endpoint=ENDPOINT,
                completion_window="24h",
                metadata={"tool": "facellm annotate", "part": part.path},
            )
            part.batch_id = batch.id
            part.status = batch.status
            bstate.save(state_path)
            summary.requests += part.requests
        if part.batch_id not in summary.batch_ids:
            summary.batch_ids.append(part.batch_id)


def _poll(
    client: Any, cfg: AnnotateConfig, bstate: BatchState, state_path: Path, sleep: Callable[[float], None]
) -> None:
    while True:
        waiting = False
        for part in bstate.parts:
            if part.merged or part.status in TERMINAL:
                continue
            batch = client.batches.retrieve(part.batch_id)
            if batch.status != part.status:
                part.status = batch.status
                bstate.save(state_path)
            if batch.status not in TERMINAL:
                waiting = True
        if not waiting:
            return
        sleep(cfg.batch_poll_s)


def _lines(client: Any, file_id: str | None) -> list[dict[str, Any]]:
    if not file_id:
        return []
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _record(
    cfg: AnnotateConfig,
    plan: Plan,
    entry: dict[str, Any],
    aspect: AspectTemplate,
    answer: str,
    *,
    ok: bool,
    error: str | None,
    usage: tuple[int, int],
    attempts: int,
) -> Annotation:
    return Annotation(
        image=entry["image"],
        image_sha256=entry["sha"],
        aspect=aspect.key,
        question=aspect.question.format(name=aspect.name),
        answer=answer if ok else "",
        status="ok" if ok else "failed",
        error=error,
        model=cfg.model,
        provider="openai",
        prompt_version=plan.prompt_set.version,
        labels=entry.get("labels", {}),
        face=entry.get("face"),
        usage=Usage(prompt_tokens=usage[0], completion_tokens=usage[1]),
        attempts=attempts,
        created=now_iso(),
    )


def _merge(
    client: Any,
    cfg: AnnotateConfig,
    plan: Plan,
    bstate: BatchState,
    part: BatchPart,
    bdir: Path,
    out: Path,
    writer: AnnotationWriter,
    reasons: dict[tuple[str, str], str],
    entries_seen: dict[tuple[str, str], dict[str, Any]],
    summary: AnnotateSummary,
    state: ProgressState,
    problems: Problems,
) -> None:
    """Append the answers of one finished batch; idempotent (pairs already ok are skipped)."""
    aspects_by_key = {a.key: a for a in plan.prompt_set.aspects}
    manifest: dict[str, dict[str, Any]] = {}
    with open(bdir / bstate.manifest, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("part") == part.path:
                manifest[rec["custom_id"]] = rec
    done_ok = done_pairs(out)
    batch = client.batches.retrieve(part.batch_id)
    if batch.status != "completed":
        problems.append(f"batch {part.batch_id} ended '{batch.status}'; its unanswered items go to the next round")
    results = _lines(client, batch.output_file_id) + _lines(client, batch.error_file_id)
    seen_ids = set()
    for res in results:
        entry = manifest.get(res.get("custom_id", ""))
        if entry is None:
            continue
        seen_ids.add(res["custom_id"])
        keys = [k for k in entry["aspects"] if k in aspects_by_key]
        for k in keys:
            entries_seen[(entry["sha"], k)] = entry
        response = res.get("response") or {}
        body = response.get("body") or {}
        if response.get("status_code") != 200:
            err = (
                (res.get("error") or {}).get("message") or (body.get("error") or {}).get("message") or "request failed"
            )
            for k in keys:
                reasons[(entry["sha"], k)] = f"batch: HTTP {response.get('status_code')}: {err}"
            continue
        usage = body.get("usage") or {}
        p_tok, c_tok = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        summary.prompt_tokens += p_tok
        summary.completion_tokens += c_tok
        summary.image_tokens += int(entry.get("tokens", 0))
        state.prompt_tokens += p_tok
        state.completion_tokens += c_tok
        try:
            text = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            text = None
        if len(keys) == 1 and bstate.mode == "per-aspect":
            answers: dict[str, str | None] = {keys[0]: text}
        else:
            try:
                answers = parse_grouped(text, keys)
            except ValueError as e:
                summary.rejected["malformed"] = summary.rejected.get("malformed", 0) + 1
                for k in keys:
                    reasons[(entry["sha"], k)] = f"malformed answer ({e})"
                continue
        n = max(1, len(keys))
        for i, k in enumerate(keys):
            if (entry["sha"], k) in done_ok:
                continue
            value = answers.get(k)
            problem = classify_answer(value, cfg.refusal_patterns, cfg.min_answer_chars)
            if problem is not None:
                summary.rejected[problem] = summary.rejected.get(problem, 0) + 1
                reasons[(entry["sha"], k)] = f"{problem} answer"
                continue
            share = (p_tok // n + (p_tok % n if i == 0 else 0), c_tok // n + (c_tok % n if i == 0 else 0))
            writer.write(
                _record(
                    cfg,
                    plan,
                    entry,
                    aspects_by_key[k],
                    (value or "").strip(),
                    ok=True,
                    error=None,
                    usage=share,
                    attempts=bstate.round,
                )
            )
            done_ok.add((entry["sha"], k))
            reasons.pop((entry["sha"], k), None)
            summary.written_ok += 1
            state.done += 1
    for cid, entry in manifest.items():
        if cid in seen_ids:
            continue
        for k in entry["aspects"]:
            entries_seen[(entry["sha"], k)] = entry
            reasons.setdefault((entry["sha"], k), f"batch {part.batch_id} returned no result ({batch.status})")
