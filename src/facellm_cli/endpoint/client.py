"""An OpenAI-compatible chat client that survives rate limits, flaky servers and dropped connections.

Uses the official ``openai`` ``AsyncOpenAI`` client with the SDK's own retries
switched off (``max_retries=0``): the SDK's retry loop sleeps while holding our
concurrency slot, cannot share a 429's Retry-After with the other requests in
flight and does not report attempts, so retries are done here instead:

* 429, 408, 409, 425, 5xx, timeouts and connection errors are retried with
  exponential backoff and jitter, at least as long as the server's
  ``Retry-After`` / ``retry-after-ms`` asks; a 429 also pauses every other
  request until that time (they would all be refused anyway);
* 401/403/404 abort the whole run (every request would fail the same way), as
  does a connection that never worked;
* other 4xx fail only the request.

annotate, evaluate and ``ask --base-url`` all use this one client. Synchronous
callers run it with ``asyncio.run`` or stream through :func:`iterate_sync`.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import EndpointError
from .messages import chat_request

if TYPE_CHECKING:
    from openai import OpenAI

    from ..config import EndpointConfig

T = TypeVar("T")
R = TypeVar("R")
RETRY_STATUS = frozenset({408, 409, 425, 429})


class RequestFailed(EndpointError):
    """One request failed for good (retries exhausted, or a 4xx that retrying cannot fix)."""

    def __init__(
        self, message: str, *, status: int | None = None, body: str = "", attempts: int = 1, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.attempts = attempts
        self.reason = reason or message  # what the last attempt failed with, without the count


class FatalEndpointError(EndpointError):
    """Every request would fail the same way (bad key, unknown model, endpoint down): stop the run."""


@dataclass
class ChatResult:
    """One answered request. ``text`` is None when the response body was malformed."""

    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    malformed: str | None = None


@dataclass
class ClientStats:
    """Live counters for progress bars and summaries."""

    in_flight: int = 0
    requests: int = 0
    retries: int = 0
    successes: int = 0


class RateLimiter:
    """Spaces request starts at least 60/rpm seconds apart (a smooth requests-per-minute cap)."""

    def __init__(self, rpm: int) -> None:
        self.interval = 60.0 / rpm
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds asked by ``retry-after-ms`` or ``Retry-After`` (delta seconds or an HTTP date)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class _Failure:
    """A failed attempt that may be retried: its kind, how to describe it, and the wait the server asked for."""

    kind: str
    desc: str
    status: int | None = None
    asked: float | None = None


class ChatClient:
    """Bounded-concurrency chat completions with our own retry policy (see module docstring)."""

    def __init__(
        self,
        ep: EndpointConfig,
        api_key: str | None,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> None:
        """A client for ``ep``; ``max_tokens`` and ``temperature`` are the per-request defaults."""
        from openai import AsyncOpenAI

        self.base_url = ep.base_url or "https://api.openai.com/v1"
        self.model = ep.model
        self.max_retries = ep.max_retries
        self.backoff_base = ep.backoff_base
        self.backoff_max = ep.backoff_max
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.stats = ClientStats()
        self._sem = asyncio.Semaphore(ep.concurrency)
        self._limiter = RateLimiter(ep.rpm) if ep.rpm else None
        self._pause_until = 0.0
        self._client = AsyncOpenAI(
            api_key=api_key or "no-key-needed", base_url=self.base_url, max_retries=0, timeout=ep.timeout_s
        )

    async def aclose(self) -> None:
        await self._client.close()

    def _backoff(self, attempt: int, asked: float | None) -> float:
        delay = min(self.backoff_max, self.backoff_base * (2**attempt))
        delay *= 0.5 + random.random() * 0.5  # equal jitter: spreads retries, keeps a floor
        if asked is not None:
            delay = max(delay, asked * (1.0 + 0.1 * random.random()))
        return delay

    async def _wait_turn(self) -> None:
        """Wait out a 429 pause shared by every request, then the rpm cap."""
        while (wait := self._pause_until - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        if self._limiter is not None:
            await self._limiter.acquire()

    async def _attempt(self, kwargs: dict[str, Any]) -> tuple[Any, BaseException | None]:
        """One request inside a concurrency slot: (response, None) or (None, the error)."""
        import openai

        async with self._sem:
            self.stats.in_flight += 1
            self.stats.requests += 1
            try:
                return await self._client.chat.completions.create(**kwargs), None
            except (openai.APIError, ValueError) as e:
                return None, e
            finally:
                self.stats.in_flight -= 1

    def _classify(self, error: BaseException) -> _Failure:
        """Name a failed attempt, or raise when retrying cannot help."""
        import openai

        if isinstance(error, openai.APIStatusError):
            status = error.status_code
            detail = _error_message(error)
            if status in (401, 403):
                raise FatalEndpointError(
                    f"endpoint {self.base_url} rejected the API key (HTTP {status}: {detail}); "
                    "check the key in the environment variable named by --api-key-env"
                )
            if status == 404:
                raise FatalEndpointError(
                    f"endpoint {self.base_url} answered 404 for model '{self.model}' ({detail}); "
                    "check --base-url (it usually ends in /v1) and --model"
                )
            if status not in RETRY_STATUS and status < 500:
                raise RequestFailed(f"HTTP {status}: {detail}", status=status, body=detail)
            asked = retry_after_seconds(getattr(error.response, "headers", None))
            return _Failure(f"http_{status}", f"HTTP {status}: {detail}", status, asked)
        if isinstance(error, openai.APITimeoutError):
            return _Failure("timeout", "timed out")
        if isinstance(error, openai.APIConnectionError):
            return _Failure("connection", f"connection error ({_short(error)})")
        raise RequestFailed(f"{type(error).__name__}: {error}")

    async def _create(self, kwargs: dict[str, Any]) -> Any:
        """The SDK's response (a completion, or a stream when asked), retried on transient failures.

        A body that says JSON but is not comes back as the ``ValueError`` itself.
        """
        attempt = 0
        while True:
            await self._wait_turn()
            response, error = await self._attempt(kwargs)
            if error is None or isinstance(error, ValueError):
                self.stats.successes += 1
                return response if error is None else error
            failure = self._classify(error)
            if attempt >= self.max_retries:
                raise self._gave_up(failure, error, attempt + 1)
            if failure.status == 429 and failure.asked is not None:
                self._pause_until = max(self._pause_until, time.monotonic() + failure.asked)
            self.stats.retries += 1
            await asyncio.sleep(self._backoff(attempt, failure.asked))
            attempt += 1

    def _gave_up(self, failure: _Failure, error: BaseException, tries: int) -> EndpointError:
        if failure.kind == "connection" and self.stats.successes == 0:
            return FatalEndpointError(
                f"cannot reach endpoint {self.base_url} ({error}); check --base-url or start the server "
                "(e.g. facellm serve --model ...)"
            )
        word = "try" if tries == 1 else "tries"
        return RequestFailed(
            f"{failure.desc} (gave up after {tries} {word})", status=failure.status, attempts=tries, reason=failure.desc
        )

    def _body(self, messages: list[dict[str, Any]], request: dict[str, Any]) -> dict[str, Any]:
        max_tokens = request.get("max_tokens", self.max_tokens)
        temperature = request.get("temperature", self.temperature)
        return chat_request(self.model, messages, max_tokens, temperature, request.get("response_format"))

    async def chat(self, messages: list[dict[str, Any]], **request: Any) -> ChatResult:
        """One chat completion, retried on transient failures; raises RequestFailed or FatalEndpointError.

        ``request`` may set response_format, max_tokens and temperature for this call.
        """
        response = await self._create(self._body(messages, request))
        if isinstance(response, ValueError):  # body said JSON but was not
            return ChatResult(text=None, malformed=f"response body is not valid JSON ({response})")
        return _parse_completion(response)

    async def stream(self, messages: list[dict[str, Any]], **request: Any) -> AsyncIterator[str]:
        """The answer's text as it arrives. Failures before the first piece are retried like ``chat``."""
        import openai

        stream = await self._create({**self._body(messages, request), "stream": True})
        if isinstance(stream, ValueError):
            raise RequestFailed(f"response body is not valid JSON ({stream})")
        try:
            async for chunk in stream:
                for choice in getattr(chunk, "choices", None) or []:
                    piece = getattr(getattr(choice, "delta", None), "content", None)
                    if piece:
                        yield piece
        except openai.APIError as e:
            raise RequestFailed(f"the stream broke off ({_short(e)})") from None
        finally:
            await stream.close()


async def as_completed(
    items: Iterable[T], answer: Callable[[T], Awaitable[R]], workers: int
) -> AsyncIterator[tuple[T, R]]:
    """(item, answer) as each finishes, ``workers`` at a time; the first error stops the rest and is raised.

    Items are taken one by one, so a long list is never encoded or held all at once.
    """
    it = iter(items)
    out: asyncio.Queue[Any] = asyncio.Queue()

    async def worker() -> None:
        try:
            for item in it:
                await out.put((item, await answer(item)))
        except Exception as e:  # handed to the consumer, which raises it
            await out.put(e)
        await out.put(None)

    tasks = [asyncio.create_task(worker()) for _ in range(max(1, workers))]
    try:
        running = len(tasks)
        while running:
            got = await out.get()
            if got is None:
                running -= 1
            elif isinstance(got, Exception):
                raise got
            else:
                yield got
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def iterate_sync(client: ChatClient, pieces: AsyncIterator[T]) -> Iterator[T]:
    """Drive an async iterator from synchronous code, one item at a time; closes the client at the end."""
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(pieces.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(_close(client, pieces))
        loop.close()


async def _close(client: ChatClient, pieces: AsyncIterator[Any]) -> None:
    aclose = getattr(pieces, "aclose", None)
    if aclose is not None:
        await aclose()
    await client.aclose()


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:200]


def _error_message(error: Any) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
        if isinstance(body.get("message"), str):
            return body["message"][:300]
    return _short(error)


def _parse_completion(response: Any) -> ChatResult:
    if isinstance(response, str):
        return ChatResult(text=None, malformed="response is not JSON")
    choices = getattr(response, "choices", None)
    if not choices:
        return ChatResult(text=None, malformed="response has no choices")
    first = choices[0]
    message = getattr(first, "message", None)
    content = getattr(message, "content", None) if message is not None else None
    if content is not None and not isinstance(content, str):
        return ChatResult(text=None, malformed="message content is not text")
    usage = getattr(response, "usage", None)
    prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0) if usage is not None else 0
    completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0) if usage is not None else 0
    return ChatResult(
        text=content,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        finish_reason=getattr(first, "finish_reason", None),
        malformed=None if message is not None else "choice has no message",
    )


def sync_sdk_client(ep: EndpointConfig, api_key: str | None) -> OpenAI:
    """The SDK's synchronous client for the Batch API's few control calls (it keeps its own retries there)."""
    import openai

    return openai.OpenAI(
        api_key=api_key or "no-key-needed", base_url=ep.base_url, max_retries=ep.max_retries, timeout=ep.timeout_s
    )
