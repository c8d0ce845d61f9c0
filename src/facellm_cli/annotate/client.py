"""An OpenAI-compatible chat client that survives rate limits, flaky servers and refusals.

Uses the official ``openai`` ``AsyncOpenAI`` client with the SDK's own retries
switched off (``max_retries=0``): the SDK's retry loop sleeps while holding our
concurrency slot, cannot share a 429's Retry-After with the other requests in
flight and does not report attempts, so retries are done here instead:

* 429, 408, 409, 5xx, timeouts and connection errors are retried with
  exponential backoff and jitter, at least as long as the server's
  ``Retry-After`` / ``retry-after-ms`` asks; a 429 also pauses every other
  request until that time (they would all be refused anyway);
* 401/403/404 abort the whole run (every request would fail the same way), as
  does a connection that never worked;
* other 4xx fail only the item.

Refusal, empty and malformed answers are not transport errors: ``classify_answer``
names them and the pipeline re-asks.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import EndpointError
from ..refusals import is_refusal

# ---- answer checks (also used by build-dataset's validation) ----------------------------------


def classify_answer(text: str | None, phrases: list[str], min_chars: int = 2) -> str | None:
    """None for a usable answer, else 'empty' or 'refusal'."""
    if text is None or len(text.strip()) < min_chars:
        return "empty"
    if is_refusal(text, phrases):
        return "refusal"
    return None


# ---- errors ----------------------------------------------------------------------------------


class RequestFailed(EndpointError):
    """One request failed for good (retries exhausted, or a 4xx that retrying cannot fix)."""

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


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
    """Live counters for the progress bar and the summary."""

    in_flight: int = 0
    requests: int = 0
    retries: int = 0
    successes: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def count_error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


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


_LOCAL_HOSTS = ("://127.0.0.1", "://localhost", "://[::1]", "://0.0.0.0")


def is_local_endpoint(base_url: str | None) -> bool:
    """Local servers (facellm serve, vLLM, llama.cpp) usually need no API key."""
    return bool(base_url) and any(h in base_url for h in _LOCAL_HOSTS)


def chat_request(
    model: str,
    messages: list[dict[str, Any]],
    max_tokens: int | None,
    temperature: float | None,
    response_format: dict[str, Any] | None,
) -> dict[str, Any]:
    """The body of one chat-completions request (live calls and Batch API lines alike); unset options are left out."""
    body: dict[str, Any] = {"model": model, "messages": messages}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    if response_format is not None:
        body["response_format"] = response_format
    return body


class ChatClient:
    """Bounded-concurrency chat completions with our own retry policy (see module docstring)."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        model: str,
        concurrency: int = 64,
        rpm: int | None = None,
        max_retries: int = 6,
        timeout: float = 120.0,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> None:
        from openai import AsyncOpenAI

        self.base_url = base_url or "https://api.openai.com/v1"
        self.model = model
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.stats = ClientStats()
        self._sem = asyncio.Semaphore(concurrency)
        self._limiter = RateLimiter(rpm) if rpm else None
        self._pause_until = 0.0
        self._client = AsyncOpenAI(api_key=api_key, base_url=self.base_url, max_retries=0, timeout=timeout)

    @property
    def raw(self) -> Any:
        """The underlying AsyncOpenAI client (files and batches use it directly)."""
        return self._client

    async def aclose(self) -> None:
        await self._client.close()

    def _backoff(self, attempt: int, asked: float | None) -> float:
        delay = min(self.backoff_max, self.backoff_base * (2**attempt))
        delay *= 0.5 + random.random() * 0.5  # equal jitter: spreads retries, keeps a floor
        if asked is not None:
            delay = max(delay, asked * (1.0 + 0.1 * random.random()))
        return delay

    async def _wait_pause(self) -> None:
        while True:
            wait = self._pause_until - time.monotonic()
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def chat(
        self, messages: list[dict[str, Any]], *, response_format: dict[str, Any] | None = None
    ) -> ChatResult:
        """One chat completion, retried on transient failures; raises RequestFailed or FatalEndpointError."""
        import openai

        kwargs = chat_request(self.model, messages, self.max_tokens, self.temperature, response_format)
        attempt = 0
        while True:
            await self._wait_pause()
            if self._limiter is not None:
                await self._limiter.acquire()
            error: BaseException | None = None
            response: Any = None
            async with self._sem:
                self.stats.in_flight += 1
                self.stats.requests += 1
                try:
                    response = await self._client.chat.completions.create(**kwargs)
                except (openai.APIError, ValueError) as e:
                    error = e
                finally:
                    self.stats.in_flight -= 1
            if error is None:
                self.stats.successes += 1
                return _parse_completion(response)
            if isinstance(error, ValueError):  # body said JSON but was not
                self.stats.successes += 1
                return ChatResult(text=None, malformed=f"response body is not valid JSON ({error})")

            status = getattr(error, "status_code", None)
            asked = retry_after_seconds(getattr(getattr(error, "response", None), "headers", None))
            if isinstance(error, openai.APIStatusError):
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
                retryable = status == 429 or status in (408, 409) or (status is not None and status >= 500)
                if not retryable:
                    raise RequestFailed(f"HTTP {status}: {detail}", status=status, body=detail)
                kind, desc = f"http_{status}", f"HTTP {status}: {detail}"
            elif isinstance(error, openai.APITimeoutError):
                kind, desc = "timeout", "timed out"
            elif isinstance(error, openai.APIConnectionError):
                kind, desc = "connection", f"connection error ({_short(error)})"
            else:
                raise RequestFailed(f"{type(error).__name__}: {error}")
            self.stats.count_error(kind)
            if attempt >= self.max_retries:
                if kind == "connection" and self.stats.successes == 0:
                    raise FatalEndpointError(
                        f"cannot reach endpoint {self.base_url} ({error}); check --base-url or start the server "
                        "(e.g. facellm serve --model ...)"
                    )
                tries = f"{attempt + 1} {'try' if attempt == 0 else 'tries'}"
                raise RequestFailed(f"{desc} (gave up after {tries})", status=status)
            delay = self._backoff(attempt, asked)
            if status == 429 and asked is not None:
                self._pause_until = max(self._pause_until, time.monotonic() + asked)
            self.stats.retries += 1
            attempt += 1
            await asyncio.sleep(delay)


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
