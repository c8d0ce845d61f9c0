"""A small dynamic batcher: requests that arrive together share one ``generate_batch`` call.

One worker thread owns the model. It waits for the first queued request, then up to
``max_wait_s`` (counted from that request's arrival) for more, and runs up to
``max_batch_size`` compatible requests as one batch while the event loop keeps
accepting connections. Requests queued during a batch are batched as soon as it ends.

What is batched together (honestly): requests with the same sampling settings. All
greedy requests (temperature 0) are compatible whatever their other fields; sampled
requests are grouped by (temperature, top_p); a sampled request with a ``seed`` runs
alone, so the same seed gives the same answer whatever else is in flight. Each row
keeps its own ``max_tokens`` and ``stop`` strings: a per-row stopping criterion ends a
row at its own limit or stop string (early, not by truncating afterwards), streams its
text as it grows, and ends the row of a client that went away. Streaming and
non-streaming requests go through the same batches.

A client that disconnects while queued is dropped before its batch forms; one that
disconnects mid-generation has its row stopped at the next token (the row is not
replaced by a new request: there is no continuous batching), and the batch ends early
when every row is done.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import GenerationConfig
from ..infer.generate import Prompt, generate_batch
from ..infer.rows import RowControl, SamplingParams

if TYPE_CHECKING:
    from ..models.loader import LoadedModel


class Cancelled(Exception):
    """The client went away; its job was dropped or its row stopped."""


class QueueFull(Exception):
    """More requests are waiting than the server is configured to queue."""


@dataclass
class Result:
    """One request's answer, with where it ran."""

    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    batch_size: int
    queued_s: float
    generate_s: float


@dataclass
class Job:
    """A request handed to the batcher; events (text deltas, then the result or an error) arrive on ``events``."""

    id: str
    prompt: Prompt
    params: SamplingParams
    stream: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue[tuple[str, Any]] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    emitted: bool = False  # a streamed delta has left the worker (then the job cannot be retried)

    def cancel(self) -> None:
        """Called from the event loop when the client disconnects."""
        self.cancelled.set()

    # -- the row of a batch it becomes (infer.rows.RowSpec) --
    @property
    def max_tokens(self) -> int:
        return self.params.max_tokens

    @property
    def stop(self) -> tuple[str, ...]:
        return self.params.stop

    def is_cancelled(self) -> bool:
        return self.cancelled.is_set()

    def emit(self, text: str) -> None:
        self._post("delta", text)
        self.emitted = True

    def _post(self, kind: str, value: Any) -> None:
        if self.loop is None:
            self.events.put_nowait((kind, value))
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    async def result(self) -> Result:
        """Wait for the final result (deltas are skipped). Raises what the worker raised."""
        while True:
            kind, value = await self.events.get()
            if kind == "done":
                return value
            if kind == "error":
                raise value


@dataclass
class BatcherStats:
    """Counters exposed at /health, so load tests (and our tests) can see batching happen."""

    batches: int = 0
    requests: int = 0
    max_batch_size_seen: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    cancelled_before_batch: int = 0
    cancelled_during_generation: int = 0
    failed: int = 0

    def snapshot(self, queued: int) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "requests": self.requests,
            "max_batch_size_seen": self.max_batch_size_seen,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "cancelled_before_batch": self.cancelled_before_batch,
            "cancelled_during_generation": self.cancelled_during_generation,
            "failed": self.failed,
            "queued": queued,
        }


class Batcher:
    """Owns the model's worker thread; ``submit`` jobs from the event loop, read their ``events``."""

    def __init__(
        self, lm: LoadedModel, max_batch_size: int = 8, max_wait_s: float = 0.01, max_queue: int = 256
    ) -> None:
        self.lm = lm
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.stats = BatcherStats()
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()

    # -- event-loop side ---------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="facellm-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the batch in progress, fail what is still queued, and end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are already queued (limit {self.max_queue})")
            self._pending.append(job)
            self._cond.notify_all()

    def snapshot(self) -> dict[str, Any]:
        with self._cond:
            return self.stats.snapshot(len(self._pending)) | {
                "max_batch_size": self.max_batch_size,
                "max_wait_ms": round(self.max_wait_s * 1000, 3),
            }

    # -- worker side -------------------------------------------------------------
    def _take_batch(self) -> list[Job] | None:
        """Block until a batch is ready (or None when stopping); drops cancelled jobs first."""
        with self._cond:
            while True:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    for job in self._pending:
                        job._post("error", QueueFull("the server is shutting down"))
                    self._pending.clear()
                    return None
                self._drop_cancelled()
                if not self._pending:
                    continue
                head = self._pending[0]
                key = head.params.group_key(head.id)
                deadline = head.enqueued_at + self.max_wait_s
                while not self._stopping:
                    same = sum(1 for j in self._pending if j.params.group_key(j.id) == key)
                    remaining = deadline - time.monotonic()
                    if same >= self.max_batch_size or remaining <= 0:
                        break
                    self._cond.wait(remaining)
                self._drop_cancelled()
                batch = [j for j in self._pending if j.params.group_key(j.id) == key][: self.max_batch_size]
                if not batch:
                    continue
                for j in batch:
                    self._pending.remove(j)
                return batch

    def _drop_cancelled(self) -> None:
        kept = collections.deque(j for j in self._pending if not j.cancelled.is_set())
        dropped = len(self._pending) - len(kept)
        if dropped:
            for j in self._pending:
                if j.cancelled.is_set():
                    j._post("error", Cancelled("client disconnected before its batch formed"))
            self.stats.cancelled_before_batch += dropped
            self._pending = kept

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._run_batch(batch)

    def _run_batch(self, batch: list[Job]) -> None:
        p0 = batch[0].params
        cfg = GenerationConfig(
            max_new_tokens=max(j.params.max_tokens for j in batch),
            temperature=p0.temperature,
            top_p=p0.top_p,
            seed=p0.seed,
        )
        control = RowControl(self.lm, batch)
        started = time.monotonic()
        try:
            gens = generate_batch(self.lm, [j.prompt for j in batch], cfg, stopping_criteria=control)
        except Exception as e:  # noqa: BLE001 - any failure must reach the clients, never kill the worker
            if len(batch) > 1:
                # Isolate the request that broke the batch: rerun each alone (unless it already streamed).
                for job in batch:
                    if job.emitted:
                        self._fail(job, e)
                    else:
                        self._run_batch([job])
                return
            self._fail(batch[0], e)
            return
        elapsed = time.monotonic() - started
        control.finish()
        with self._cond:
            s = self.stats
            s.batches += 1
            s.requests += len(batch)
            s.batch_sizes[len(batch)] += 1
            s.max_batch_size_seen = max(s.max_batch_size_seen, len(batch))
            s.cancelled_during_generation += sum(r.reason == "cancelled" for r in control.rows)
        for job, gen, row in zip(batch, gens, control.rows, strict=True):
            if row.reason == "cancelled":
                job._post("error", Cancelled("client disconnected during generation"))
                continue
            job._post(
                "done",
                Result(
                    text=row.text.strip(),
                    finish_reason=row.reason,
                    prompt_tokens=gen.prompt_tokens,
                    completion_tokens=len(row.ids),
                    batch_size=len(batch),
                    queued_s=started - job.enqueued_at,
                    generate_s=elapsed,
                ),
            )

    def _fail(self, job: Job, error: Exception) -> None:
        with self._cond:
            self.stats.failed += 1
        job._post("error", error)
