"""The live strategy: every image x aspect (or image, grouped) as its own request, many in flight.

Requests go through the shared :class:`~facellm_cli.endpoint.client.ChatClient`
(retries, Retry-After, 429 pause). Refused, empty and malformed answers are
re-asked up to ``max_reasks`` times; each image is encoded once for all its
aspects and freed when they are done.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ...endpoint.client import ChatClient, ChatResult, RequestFailed
from ...endpoint.messages import chat_messages
from ...errors import ImageError
from ...images import encode_for_request
from ...refusals import classify_answer
from ..pricing import image_tokens
from ..prompts import AspectTemplate, grouped_json_schema, parse_grouped, render_aspect, render_grouped
from ..run import Run, WorkImage
from ..store import AnnotationWriter


@dataclass
class _Image:
    data_uri: str
    tokens: int


def _encode(run: Run, w: WorkImage) -> _Image:
    enc = encode_for_request(w.item.path, run.cfg.endpoint.max_image_side)
    return _Image(enc.data_uri, image_tokens(enc.width, enc.height, run.cfg.image_detail))


class _ImageCache:
    """Each image is decoded and encoded once, shared by its aspects, and freed when they are done."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self._tasks: dict[str, asyncio.Future[_Image]] = {}
        self._refs: dict[str, int] = {}

    def add_refs(self, sha: str, n: int) -> None:
        self._refs[sha] = self._refs.get(sha, 0) + n

    async def get(self, w: WorkImage) -> _Image:
        fut = self._tasks.get(w.sha)
        if fut is None:
            fut = asyncio.ensure_future(asyncio.to_thread(_encode, self.run, w))
            self._tasks[w.sha] = fut
        return await asyncio.shield(fut)

    def release(self, sha: str) -> None:
        self._refs[sha] -= 1
        if self._refs[sha] <= 0:
            self._refs.pop(sha, None)
            self._tasks.pop(sha, None)


class _Grouped:
    """The state of one image's grouped request across re-asks: what is answered, what each aspect used."""

    def __init__(self, pending: list[AspectTemplate]) -> None:
        self.remaining = list(pending)
        self.answers: dict[str, str] = {}
        self.used: dict[str, list[int]] = {a.key: [0, 0] for a in pending}
        self.asks: dict[str, int] = {a.key: 0 for a in pending}
        self.reasons: dict[str, str] = {}

    def fail_all(self, reason: str) -> None:
        for a in self.remaining:
            self.reasons[a.key] = reason

    def share_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Split one request's usage over its aspects so the records sum to the total."""
        n = len(self.remaining)
        for i, a in enumerate(self.remaining):
            self.used[a.key][0] += prompt_tokens // n + (prompt_tokens % n if i == 0 else 0)
            self.used[a.key][1] += completion_tokens // n + (completion_tokens % n if i == 0 else 0)


class _Live:
    def __init__(self, run: Run, writer: AnnotationWriter, client: ChatClient) -> None:
        self.run = run
        self.cfg = run.cfg
        self.ps = run.plan.prompt_set
        self.writer = writer
        self.client = client
        self.images = _ImageCache(run)
        self.structured = run.cfg.structured_output != "text"
        self.bad_images: set[str] = set()

    def _write(
        self, w: WorkImage, aspect: AspectTemplate, answer: str, error: str | None, usage: list[int], attempts: int
    ) -> None:
        record = self.run.answer_record(
            image=w.item.name,
            sha=w.sha,
            labels=w.item.labels,
            face=w.item.face,
            aspect=aspect,
            answer=answer,
            error=error,
            usage=(usage[0], usage[1]),
            attempts=attempts,
        )
        self.writer.write(record)
        self.run.state.done += 1
        if error is None:
            self.run.summary.written_ok += 1
        else:
            self.run.summary.failed += 1
            self.run.state.failed += 1

    async def _image(self, w: WorkImage) -> _Image | None:
        try:
            return await self.images.get(w)
        except ImageError as e:
            if w.sha not in self.bad_images:
                self.bad_images.add(w.sha)
                self.run.problems.skip(str(e))
            return None

    def _problem(self, text: str | None) -> str | None:
        return classify_answer(text, self.cfg.refusal_patterns, self.cfg.min_answer_chars)

    async def per_aspect(self, w: WorkImage, aspect: AspectTemplate) -> None:
        try:
            image = await self._image(w)
            if image is None:
                self.run.state.total -= 1
                return
            prompt, _question = render_aspect(self.ps, aspect, w.item.labels)
            messages = chat_messages(self.ps.system, prompt, [image.data_uri], detail=self.cfg.image_detail)
            used = [0, 0]
            reason = "no answer"
            for ask in range(self.cfg.max_reasks + 1):
                if ask:
                    self.run.summary.reasks += 1
                try:
                    result = await self.client.chat(messages)
                except RequestFailed as e:
                    reason = str(e)
                    break
                used = [used[0] + result.prompt_tokens, used[1] + result.completion_tokens]
                self.run.add_usage(result.prompt_tokens, result.completion_tokens, image.tokens)
                problem = "malformed" if result.malformed else self._problem(result.text)
                if problem is None:
                    self._write(w, aspect, (result.text or "").strip(), None, used, ask + 1)
                    return
                self.run.summary.reject(problem)
                reason = f"{problem} answer" + (f" ({result.malformed})" if result.malformed else "")
            self._write(w, aspect, "", reason, used, ask + 1)
        finally:
            self.images.release(w.sha)

    async def _ask_grouped(self, w: WorkImage, image: _Image, g: _Grouped) -> str:
        """One grouped request for the aspects still unanswered.

        Returns "asked", "stop" (the request failed for good) or "again" (the endpoint has no
        structured outputs: the same ask is repeated with JSON in the text).
        """
        text = render_grouped(self.ps, g.remaining, w.item.labels)
        messages = chat_messages(self.ps.system, text, [image.data_uri], detail=self.cfg.image_detail)
        structured = self.structured
        for a in g.remaining:
            g.asks[a.key] += 1
        try:
            result = await self.client.chat(
                messages, response_format=grouped_json_schema(g.remaining) if structured else None
            )
        except RequestFailed as e:
            if structured and e.status == 400 and self.cfg.structured_output == "auto":
                self.structured = False  # endpoint has no structured outputs: JSON-in-text from now on
                for a in g.remaining:
                    g.asks[a.key] -= 1
                return "again"
            g.fail_all(str(e))
            return "stop"
        self.run.add_usage(result.prompt_tokens, result.completion_tokens, image.tokens)
        g.share_usage(result.prompt_tokens, result.completion_tokens)
        self._take_grouped(result, g)
        return "asked"

    def _take_grouped(self, result: ChatResult, g: _Grouped) -> None:
        try:
            if result.malformed:
                raise ValueError(result.malformed)
            parsed = parse_grouped(result.text, [a.key for a in g.remaining])
        except ValueError as e:
            self.run.summary.reject("malformed")
            g.fail_all(f"malformed answer ({e})")
            return
        still = []
        for a in g.remaining:
            value = parsed.get(a.key)
            problem = self._problem(value)
            if problem is None:
                g.answers[a.key] = (value or "").strip()
            else:
                self.run.summary.reject(problem)
                g.reasons[a.key] = f"{problem} answer"
                still.append(a)
        g.remaining = still

    async def grouped(self, w: WorkImage) -> None:
        try:
            image = await self._image(w)
            if image is None:
                self.run.state.total -= len(w.pending)
                return
            g = _Grouped(w.pending)
            ask = 0
            while g.remaining and ask <= self.cfg.max_reasks:
                if ask:
                    self.run.summary.reasks += 1
                outcome = await self._ask_grouped(w, image, g)
                if outcome == "stop":
                    break
                ask += outcome == "asked"
            for a in w.pending:
                ok = a.key in g.answers
                error = None if ok else g.reasons.get(a.key, "no answer")
                self._write(w, a, g.answers.get(a.key, ""), error, g.used[a.key], max(1, g.asks[a.key]))
        finally:
            self.images.release(w.sha)


async def _work(live: _Live, run: Run) -> None:
    """Feed every pending job to ``2 x concurrency`` workers (those sleeping in backoff must not starve the endpoint)."""
    n_workers = run.cfg.endpoint.concurrency * 2
    jobs: asyncio.Queue[tuple[WorkImage, AspectTemplate | None] | None] = asyncio.Queue(maxsize=n_workers)

    async def producer() -> None:
        for w in run.plan.work:
            if not w.pending:
                continue
            per_aspect = run.cfg.mode == "per-aspect"
            live.images.add_refs(w.sha, len(w.pending) if per_aspect else 1)
            for a in w.pending if per_aspect else [None]:
                await jobs.put((w, a))
        for _ in range(n_workers):
            await jobs.put(None)

    async def worker() -> None:
        while (job := await jobs.get()) is not None:
            w, a = job
            await (live.grouped(w) if a is None else live.per_aspect(w, a))

    tasks = [asyncio.create_task(producer())] + [asyncio.create_task(worker()) for _ in range(n_workers)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            exc = t.exception()
            if exc is not None:
                raise exc
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _tick(run: Run, client: ChatClient) -> None:
    while True:
        run.state.in_flight = client.stats.in_flight
        run.report()
        await asyncio.sleep(0.1)


async def _run(run: Run) -> None:
    cfg = run.cfg
    client = ChatClient(cfg.endpoint, run.api_key, max_tokens=cfg.max_tokens, temperature=cfg.temperature)
    try:
        with AnnotationWriter(run.out) as writer:
            tick = asyncio.create_task(_tick(run, client))
            try:
                await _work(_Live(run, writer, client), run)
            finally:
                tick.cancel()
                await asyncio.gather(tick, return_exceptions=True)
            run.state.in_flight = 0
            run.report()
    finally:
        run.summary.requests = client.stats.requests
        run.summary.retries = client.stats.retries
        await client.aclose()


def run(run: Run) -> None:
    asyncio.run(_run(run))
