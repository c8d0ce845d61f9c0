"""The batch strategy (``--batch``): the same job through the OpenAI Batch API (half price, up to 24 h per batch).

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

from ...config import AnnotateConfig
from ...endpoint.client import sync_sdk_client
from ...endpoint.messages import chat_messages, chat_request
from ...errors import EndpointError, ImageError
from ...images import encode_for_request
from ...io import atomic_write_json
from ...refusals import classify_answer
from ..pricing import image_tokens
from ..prompts import AspectTemplate, grouped_json_schema, parse_grouped, render_aspect, render_grouped
from ..run import Run, WorkImage
from ..store import AnnotationWriter, done_pairs

if TYPE_CHECKING:
    from openai import OpenAI

    from ...schema import Annotation

TERMINAL = {"completed", "failed", "expired", "cancelled"}
ENDPOINT: Final = "/v1/chat/completions"


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


class _RoundFiles:
    """The request files of one round, each closed before it would pass the API limits, and their manifest."""

    def __init__(self, run: Run, bdir: Path, state: BatchState, left_out: set[str]) -> None:
        self.run = run
        self.bdir = bdir
        self.state = state
        self.left_out = left_out
        self.manifest = open(bdir / state.manifest, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.current: IO[bytes] | None = None
        self.count = self.size = 0

    def _close_part(self) -> None:
        if self.current is not None:
            self.current.close()
            self.state.parts[-1].requests, self.state.parts[-1].bytes = self.count, self.size
            self.current = None

    def close(self) -> None:
        self._close_part()
        self.manifest.close()

    def emit(self, custom_id: str, body: dict[str, Any], entry: dict[str, Any]) -> None:
        cfg = self.run.cfg
        line = (json.dumps({"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}) + "\n").encode()
        if len(line) > cfg.batch_max_bytes:
            if entry["sha"] not in self.left_out:
                self.left_out.add(entry["sha"])
                self.run.problems.skip(
                    f"request for {entry['image']} is {len(line):,} bytes, over batch_max_bytes; skipped"
                )
            return
        full = self.count + 1 > cfg.batch_max_requests or self.size + len(line) > cfg.batch_max_bytes
        if self.current is not None and full:
            self._close_part()
        if self.current is None:
            path = self.bdir / f"round{self.state.round}_part{len(self.state.parts) + 1}.jsonl"
            self.state.parts.append(BatchPart(path=path.name, requests=0, bytes=0))
            self.current = open(path, "wb")  # noqa: SIM115 - closed in _close_part
            self.count = self.size = 0
        self.current.write(line)
        self.count += 1
        self.size += len(line)
        self.manifest.write(json.dumps({"custom_id": custom_id, "part": self.state.parts[-1].path, **entry}) + "\n")


def _emit_image(files: _RoundFiles, run: Run, w: WorkImage, aspects: list[AspectTemplate]) -> None:
    """The requests of one image (one per aspect, or one grouped); unreadable images are left out once."""
    cfg, ps = run.cfg, run.plan.prompt_set
    try:
        image = encode_for_request(w.item.path, cfg.endpoint.max_image_side)
    except ImageError as e:
        files.left_out.add(w.sha)
        run.problems.skip(str(e))
        return
    tokens = image_tokens(image.width, image.height, cfg.image_detail)
    entry: dict[str, Any] = {"image": w.item.name, "sha": w.sha, "labels": w.item.labels, "tokens": tokens}
    if w.item.face is not None:
        entry["face"] = w.item.face.model_dump(mode="json")

    def body(text: str, rf: dict[str, Any] | None) -> dict[str, Any]:
        messages = chat_messages(ps.system, text, [image.data_uri], detail=cfg.image_detail)
        return chat_request(cfg.endpoint.model, messages, cfg.max_tokens, cfg.temperature, rf)

    if cfg.mode == "per-aspect":
        for a in aspects:
            prompt, _ = render_aspect(ps, a, w.item.labels)
            files.emit(f"{w.sha}:{a.key}", body(prompt, None), {**entry, "aspects": [a.key]})
        return
    rf = grouped_json_schema(aspects) if cfg.structured_output != "text" else None
    text = render_grouped(ps, aspects, w.item.labels)
    files.emit(f"{w.sha}:*", body(text, rf), {**entry, "aspects": [a.key for a in aspects]})


def write_round(
    run: Run, todo: dict[str, list[AspectTemplate]], bdir: Path, round_no: int, left_out: set[str]
) -> BatchState:
    """Write the request files (split under the limits) and the manifest for one round.

    Images that cannot be sent (unreadable, or a request over the size limit) are reported
    once and added to ``left_out``, which later rounds skip.
    """
    bdir.mkdir(parents=True, exist_ok=True)
    cfg = run.cfg
    by_sha = {w.sha: w for w in run.plan.work}
    manifest = f"round{round_no}_manifest.jsonl"
    state = BatchState(round=round_no, model=cfg.endpoint.model, mode=cfg.mode, manifest=manifest)
    files = _RoundFiles(run, bdir, state, left_out)
    try:
        for sha, aspects in todo.items():
            if sha not in left_out:
                _emit_image(files, run, by_sha[sha], aspects)
    finally:
        files.close()
    return state


def _lines(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if not file_id:
        return []
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class _Batches:
    """Rounds of submit, poll and merge, with what each unanswered pair last failed with."""

    def __init__(self, run: Run, client: OpenAI) -> None:
        self.run = run
        self.cfg = run.cfg
        self.client = client
        self.bdir = batch_dir_for(run.cfg, run.out)
        self.state_path = self.bdir / "state.json"
        self.aspects_by_key = {a.key: a for a in run.plan.prompt_set.aspects}
        self.reasons: dict[tuple[str, str], str] = {}
        self.entries_seen: dict[tuple[str, str], dict[str, Any]] = {}
        self.left_out: set[str] = set()  # images that cannot be sent: reported once, not retried

    def _pending(self) -> dict[str, list[AspectTemplate]]:
        done_ok = done_pairs(self.run.out)
        todo: dict[str, list[AspectTemplate]] = {}
        for w in self.run.plan.work:
            left = [a for a in w.pending if (w.sha, a.key) not in done_ok]
            if left and w.sha not in self.left_out:
                todo[w.sha] = left
        return todo

    def _next_round(self, rounds: int) -> BatchState | None:
        """The round to work on: one left unfinished by an earlier run, else a new one (None: nothing to do)."""
        bstate = BatchState.load(self.state_path)
        if bstate is not None and bstate.active:
            return bstate
        todo = self._pending()
        if not todo or rounds >= self.cfg.max_reasks + 1:
            return None
        state = self.run.state
        state.total = max(state.total, state.done + sum(len(v) for v in todo.values()))
        round_no = (bstate.round + 1) if bstate else 1
        bstate = write_round(self.run, todo, self.bdir, round_no, self.left_out)
        bstate.save(self.state_path)
        return bstate if bstate.parts else None

    def rounds(self) -> None:
        rounds = 0  # rounds started or resumed by this invocation; a later run starts counting again
        summary = self.run.summary
        while (bstate := self._next_round(rounds)) is not None:
            rounds += 1
            before = summary.requests
            self._submit(bstate)
            if rounds > 1:  # rounds after the first re-ask what was refused or failed
                summary.reasks += summary.requests - before
            self._poll(bstate)
            with AnnotationWriter(self.run.out) as writer:
                for part in bstate.parts:
                    if not part.merged:
                        self._merge(bstate, part, writer)
                        part.merged = True
                        bstate.save(self.state_path)
                        self.run.report()

    def record_unanswered(self) -> None:
        """What is still unanswered after the last round is recorded as failed (a later run retries it)."""
        done_ok = done_pairs(self.run.out)
        with AnnotationWriter(self.run.out) as writer:
            for (sha, key), reason in self.reasons.items():
                if (sha, key) in done_ok or key not in self.aspects_by_key:
                    continue
                writer.write(self._record(self.entries_seen[(sha, key)], key, "", reason, (0, 0), 1))
                self.run.summary.failed += 1
                self.run.state.failed += 1

    def _submit(self, bstate: BatchState) -> None:
        for part in bstate.parts:
            if part.file_id is None:
                with open(self.bdir / part.path, "rb") as f:
                    part.file_id = self.client.files.create(file=(part.path, f), purpose="batch").id
                bstate.save(self.state_path)
            if part.batch_id is None:
                batch = self.client.batches.create(
                    input_file_id=part.file_id,
                    endpoint=ENDPOINT,
                    completion_window="24h",
                    metadata={"tool": "facellm annotate", "part": part.path},
                )
                part.batch_id, part.status = batch.id, batch.status
                bstate.save(self.state_path)
                self.run.summary.requests += part.requests
            if part.batch_id not in self.run.summary.batch_ids:
                self.run.summary.batch_ids.append(part.batch_id)

    def _poll(self, bstate: BatchState) -> None:
        while True:
            waiting = False
            for part in bstate.parts:
                if part.merged or part.status in TERMINAL:
                    continue
                assert part.batch_id is not None  # _submit gave every part a batch before polling
                batch = self.client.batches.retrieve(part.batch_id)
                if batch.status != part.status:
                    part.status = batch.status
                    bstate.save(self.state_path)
                waiting = waiting or batch.status not in TERMINAL
            if not waiting:
                return
            time.sleep(self.cfg.batch_poll_s)

    def _record(
        self, entry: dict[str, Any], key: str, answer: str, error: str | None, usage: tuple[int, int], attempts: int
    ) -> Annotation:
        return self.run.answer_record(
            image=entry["image"],
            sha=entry["sha"],
            labels=entry.get("labels", {}),
            face=entry.get("face"),
            aspect=self.aspects_by_key[key],
            answer=answer,
            error=error,
            usage=usage,
            attempts=attempts,
        )

    def _manifest(self, bstate: BatchState, part: BatchPart) -> dict[str, dict[str, Any]]:
        manifest: dict[str, dict[str, Any]] = {}
        with open(self.bdir / bstate.manifest, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("part") == part.path:
                    manifest[rec["custom_id"]] = rec
        return manifest

    def _merge(self, bstate: BatchState, part: BatchPart, writer: AnnotationWriter) -> None:
        """Append the answers of one finished batch; idempotent (pairs already ok are skipped)."""
        manifest = self._manifest(bstate, part)
        done_ok = done_pairs(self.run.out)
        assert part.batch_id is not None  # only submitted parts finish and merge
        batch = self.client.batches.retrieve(part.batch_id)
        if batch.status != "completed":
            self.run.problems.append(
                f"batch {part.batch_id} ended '{batch.status}'; its unanswered items go to the next round"
            )
        seen_ids = set()
        for res in _lines(self.client, batch.output_file_id) + _lines(self.client, batch.error_file_id):
            entry = manifest.get(res.get("custom_id", ""))
            if entry is not None:
                seen_ids.add(res["custom_id"])
                self._merge_result(bstate, entry, res, writer, done_ok)
        for cid, entry in manifest.items():
            if cid in seen_ids:
                continue
            for k in entry["aspects"]:
                self.entries_seen[(entry["sha"], k)] = entry
                self.reasons.setdefault((entry["sha"], k), f"batch {part.batch_id} returned no result ({batch.status})")

    def _answers(self, bstate: BatchState, keys: list[str], body: dict[str, Any]) -> Any:
        """{aspect key: answer text} from one result body; raises ValueError for a malformed grouped answer."""
        try:
            text = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            text = None
        if len(keys) == 1 and bstate.mode == "per-aspect":
            return {keys[0]: text}
        return parse_grouped(text, keys)

    def _merge_result(
        self,
        bstate: BatchState,
        entry: dict[str, Any],
        res: dict[str, Any],
        writer: AnnotationWriter,
        done_ok: set[tuple[str, str]],
    ) -> None:
        keys = [k for k in entry["aspects"] if k in self.aspects_by_key]
        sha = entry["sha"]
        for k in keys:
            self.entries_seen[(sha, k)] = entry
        response = res.get("response") or {}
        body = response.get("body") or {}
        if response.get("status_code") != 200:
            err = (res.get("error") or {}).get("message") or (body.get("error") or {}).get("message")
            for k in keys:
                self.reasons[(sha, k)] = f"batch: HTTP {response.get('status_code')}: {err or 'request failed'}"
            return
        usage = body.get("usage") or {}
        p_tok, c_tok = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
        self.run.add_usage(p_tok, c_tok, int(entry.get("tokens", 0)))
        try:
            answers = self._answers(bstate, keys, body)
        except ValueError as e:
            self.run.summary.reject("malformed")
            for k in keys:
                self.reasons[(sha, k)] = f"malformed answer ({e})"
            return
        n = max(1, len(keys))
        for i, k in enumerate(keys):
            if (sha, k) in done_ok:
                continue
            value = answers.get(k)
            problem = classify_answer(value, self.cfg.refusal_patterns, self.cfg.min_answer_chars)
            if problem is not None:
                self.run.summary.reject(problem)
                self.reasons[(sha, k)] = f"{problem} answer"
                continue
            share = (p_tok // n + (p_tok % n if i == 0 else 0), c_tok // n + (c_tok % n if i == 0 else 0))
            writer.write(self._record(entry, k, (value or "").strip(), None, share, bstate.round))
            done_ok.add((sha, k))
            self.reasons.pop((sha, k), None)
            self.run.summary.written_ok += 1
            self.run.state.done += 1


def run(run: Run) -> None:
    """Submit, poll and merge rounds of batches until everything is answered or the re-asks run out."""
    import openai

    client = sync_sdk_client(run.cfg.endpoint, run.api_key)
    batches = _Batches(run, client)
    base_url = run.cfg.endpoint.base_url or "api.openai.com"
    try:
        batches.rounds()
        batches.record_unanswered()
    except openai.AuthenticationError as e:
        raise EndpointError(
            f"endpoint rejected the API key ({e.status_code}); check the variable named by --api-key-env"
        ) from None
    except openai.APIConnectionError as e:
        raise EndpointError(f"cannot reach the batch endpoint {base_url} ({e}); re-run to resume") from None
    except openai.APIStatusError as e:
        raise EndpointError(f"batch API call failed: HTTP {e.status_code} ({e.message}); re-run to resume") from None
    finally:
        client.close()
