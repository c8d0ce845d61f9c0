"""``serve --engine vllm``: each request goes straight to vLLM's async engine (continuous batching).

It replaces :class:`batcher.Batcher` for that engine with the same surface — ``start``,
``stop``, ``submit(job)``, ``snapshot()`` and the job's events (text deltas, then the
:class:`batcher.Result` or an error) — so the app's auth, limits, validation, logs and
error JSON are the same for both engines. vLLM's scheduler adds a request to the running
batch at the next step and frees its row when it ends; there is no batching window
(``max_batch_size``/``max_wait_ms`` apply to the transformers engine; vLLM's own limit is
``model.vllm.max_num_seqs``). A client that goes away has its request aborted in vLLM.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING, Any

from .batcher import Cancelled, Job, QueueFull, Result

if TYPE_CHECKING:
    from ..infer.vllm_engine import VllmEngine


class VllmScheduler:
    """Hands jobs to a :class:`VllmEngine`; at most ``max_queue`` requests in flight (429 beyond)."""

    def __init__(self, engine: VllmEngine, max_queue: int = 256) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._inflight: dict[str, Any] = {}
        self._stopping = False
        self.requests = 0
        self.max_in_flight_seen = 0
        self.cancelled = 0
        self.failed = 0

    def start(self) -> None:
        with self._lock:
            self._stopping = False

    def stop(self, timeout: float | None = 30.0) -> None:
        """Refuse new jobs and cancel those in flight (vLLM aborts them)."""
        with self._lock:
            self._stopping = True
            futures = list(self._inflight.values())
        for fut in futures:
            fut.cancel()
        deadline = time.monotonic() + (timeout or 0)
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.01)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._inflight) >= self.max_queue:
                raise QueueFull(f"{len(self._inflight)} requests are already in flight (limit {self.max_queue})")
            self.requests += 1
            fut = self.engine.submit(self._run(job, len(self._inflight) + 1))
            self._inflight[job.id] = fut
            self.max_in_flight_seen = max(self.max_in_flight_seen, len(self._inflight))
        fut.add_done_callback(lambda _f, jid=job.id: self._done(jid))

    def _done(self, job_id: str) -> None:
        with self._lock:
            self._inflight.pop(job_id, None)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "engine": "vllm",
                "requests": self.requests,
                "in_flight": len(self._inflight),
                "max_in_flight_seen": self.max_in_flight_seen,
                "cancelled_during_generation": self.cancelled,
                "failed": self.failed,
                "max_queue": self.max_queue,
            }

    async def _run(self, job: Job, running: int) -> None:
        """Generate one job on the engine's loop, posting its deltas and result; abort it if the client left."""
        params = job.params
        started = time.monotonic()
        state: dict[str, Any] = {"text": "", "sent": 0, "final": None}

        async def generate() -> None:
            async for delta, final in self.engine.agenerate(job.prompt, params, job.id):
                if final is not None:
                    state["final"] = final
                    break
                state["text"] += delta
                if job.stream:
                    visible = state["text"].lstrip()
                    if len(visible) > state["sent"]:
                        job._post("delta", visible[state["sent"] :])
                        job.emitted = True
                        state["sent"] = len(visible)

        task = asyncio.ensure_future(generate())
        try:
            while not task.done():
                if job.cancelled.is_set():
                    task.cancel()
                    break
                await asyncio.wait({task}, timeout=0.05)
            await task
        except asyncio.CancelledError:
            if not task.done():
                task.cancel()
            with self._lock:
                self.cancelled += 1
            job._post("error", Cancelled("client disconnected during generation"))
            return
        except Exception as e:  # noqa: BLE001 - a failed request is this client's error, never the server's end
            with self._lock:
                self.failed += 1
            job._post("error", e)
            return
        final = state["final"]
        job._post(
            "done",
            Result(
                text=state["text"].strip(),
                finish_reason=final.finish_reason if final else "length",
                prompt_tokens=final.prompt_tokens if final else 0,
                completion_tokens=final.completion_tokens if final else 0,
                batch_size=running,
                queued_s=0.0,
                generate_s=time.monotonic() - started,
            ),
        )
