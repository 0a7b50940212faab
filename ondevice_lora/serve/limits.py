"""How much the server takes on: the bounded queue, the time limit, the context window.

One worker answers every request in turn, so without bounds a burst of requests (or one asking
for a billion tokens) would keep everyone after it waiting for minutes. Each request is checked
against the model's context before it is queued, the queue holds at most `max_queue` requests
behind the running one (more are answered 503 with Retry-After), and each request has
`request_timeout` seconds from arrival to its last token.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading

from ..errors import OndeviceLoraError
from .schema import APIError, CompletionRequest


@dataclasses.dataclass
class ServeLimits:
    """The server's bounds (`ondevice-lora serve --max-queue / --request-timeout`)."""

    max_queue: int = 8  # requests that may wait behind the running one; more get 503
    request_timeout: float = 300.0  # seconds from arrival to the last token; past it: 504

    def __post_init__(self):
        problems = []
        if not (isinstance(self.max_queue, int) and self.max_queue >= 0):
            problems.append(f"max_queue must be an integer >= 0, got {self.max_queue!r}")
        timeout = self.request_timeout
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            problems.append(f"request_timeout must be a number of seconds > 0, got {timeout!r}")
        if problems:
            raise OndeviceLoraError("invalid server limits: " + "; ".join(problems))


@dataclasses.dataclass
class ServeStats:
    """What the worker did, for the load benchmark and the tests: counts, and how fast it let
    go of requests whose client left."""

    completed: int = 0
    cancelled: int = 0  # the client went away, or the time limit passed, mid-request
    refused: int = 0  # answered 503: the queue was full
    # (seconds from a generation's cancellation to the worker dropping it, seconds of the model
    # step it was in): the first is at most the second, the worker checks after every token.
    release_lags: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    # The most recent decode steps' durations, in seconds.
    step_seconds: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=512)
    )
    # The most recent requests' durations on the worker, for Retry-After.
    job_seconds: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=32)
    )


class Admission:
    """Counts the requests queued or running; refuses one more than the queue holds."""

    def __init__(self, limits: ServeLimits, stats: ServeStats):
        self.capacity = limits.max_queue + 1  # the running request and those waiting behind it
        self.stats = stats
        self.pending = 0
        self._lock = threading.Lock()  # taken on the event loop and on the worker thread

    def admit(self) -> None:
        """Count one more request in, or raise APIError 503 with Retry-After."""
        with self._lock:
            if self.pending < self.capacity:
                self.pending += 1
                return
            self.stats.refused += 1
            pending = self.pending
        recent = list(self.stats.job_seconds)
        # Until about one request has left the queue.
        retry = max(1, math.ceil(sum(recent) / len(recent))) if recent else 1
        raise APIError(
            503,
            f"the server is busy: {pending} requests are queued or running, the most it holds "
            f"(--max-queue {self.capacity - 1}). Retry after {retry} s.",
            code="server_busy",
            headers={"Retry-After": str(retry)},
        )

    def release(self) -> None:
        with self._lock:
            self.pending -= 1


def fit_to_context(request: CompletionRequest, prompt_tokens: int, context: int) -> None:
    """Refuse a prompt that leaves no room in the model's context, or a max_tokens that could
    never fit; cap max_tokens to the room the prompt leaves (finish_reason "length" then)."""
    param = "messages" if request.chat else "prompt"
    if prompt_tokens >= context:
        raise APIError(
            400,
            f"the prompt is {prompt_tokens} tokens; the model's context is {context} tokens, "
            "which must hold the prompt and at least one new token. Shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )
    max_tokens = request.sampling.max_tokens
    if max_tokens > context:
        raise APIError(
            400,
            f"max_tokens is {max_tokens}; the model's context is {context} tokens (the prompt "
            f"takes {prompt_tokens}, leaving {context - prompt_tokens}). Ask for fewer tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    room = context - prompt_tokens
    if max_tokens > room:
        request.sampling = dataclasses.replace(request.sampling, max_tokens=room)
