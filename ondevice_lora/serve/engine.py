"""The one model the server holds, and the single thread that runs every generation on it.

MLX arrays and our models are not safe to use from several threads at once, and the active
adapters are state on the shared base: so one worker thread owns the model (it loads it too)
and runs the requests one at a time, in the order they arrived. Each request gets an asyncio
queue the worker feeds text pieces into; a client that goes away (streamed or not), or a request
past its time limit, sets a flag the worker checks after every token, so an abandoned request
frees the model within one decode step. limits.py bounds the queue and fits each request to the
model's context.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx

from ..adapters.mix import load_adapters, set_active
from ..errors import OndeviceLoraError
from ..generation.generate import encode_prompt, generate_tokens
from ..loading.tokenizer import StreamingDetokenizer
from .limits import Admission, ServeLimits, ServeStats, fit_to_context
from .schema import DEFAULT_MODEL, APIError, CompletionRequest


class StopMatcher:
    """Cuts a stream of text pieces at the first of the `stops` strings (which is dropped).

    Text that could be the start of a stop string is held back until the next piece shows
    whether it is one, so a streamed answer never shows part of a stop string.
    """

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        self.pending += piece
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            text, self.pending = self.pending[: min(found)], ""
            return text, True
        # Keep the longest tail that is a proper prefix of some stop string.
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:n]):
                    hold = n
                    break
        cut = len(self.pending) - hold
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, False

    def finish(self) -> str:
        text, self.pending = self.pending, ""
        return text


@dataclasses.dataclass
class Finished:
    """The last event of a generation."""

    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


class _Job:
    """One request's channel from the worker thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.cancelled_at: float | None = None  # time.monotonic() of the cancellation
        self.deadline = deadline  # time.monotonic() by which the last token must be out

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def cancel(self) -> None:
        if not self.cancelled.is_set():
            self.cancelled_at = time.monotonic()
            self.cancelled.set()


class Engine:
    """The base model, its adapters by served name, and the worker thread.

    models: {served id: adapter name, or None for the base model alone}.
    """

    def __init__(
        self, load, base_id: str, adapters: dict[str, str], limits: ServeLimits | None = None
    ):
        for taken in (base_id, DEFAULT_MODEL):
            if taken in adapters:
                raise OndeviceLoraError(
                    f"adapter name {taken!r} is also the base model's id; name the adapter "
                    "differently (--adapter NAME=FOLDER)."
                )
        self.models = {base_id: None, **{name: name for name in adapters}}
        self.base_id = base_id
        self.limits = limits or ServeLimits()
        self.stats = ServeStats()
        self._admission = Admission(self.limits, self.stats)
        # One thread, so every MLX call (loading included) happens on it, one job at a time.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ondevice-lora-gen")
        self._closing = threading.Event()
        self.model, self.tokenizer = self._worker.submit(self._load, load, adapters).result()

    @staticmethod
    def _load(load, adapters):
        model, tokenizer = load()
        if adapters:
            load_adapters(model, adapters, tokenizer)
        return model, tokenizer

    def close(self) -> None:
        """Drop the waiting requests, finish the running one's current token, stop the thread."""
        self._closing.set()
        # MLX wants each thread that used it to free its streams before it ends; without this
        # the process aborts at exit ("terminate called without an active exception").
        self._worker.submit(mx.clear_streams)
        self._worker.shutdown(wait=True)

    @property
    def context_length(self) -> int:
        """The most tokens (prompt and answer) one request may hold: the model's context."""
        return self.model.args.max_position_embeddings

    def prepare(self, request: CompletionRequest) -> list[int]:
        """The request's prompt ids, once its model is resolved ("default" or none: the base)
        and it fits the context (max_tokens capped to the room left); raises APIError."""
        if request.model == DEFAULT_MODEL:
            request.model = self.base_id
        ids = self.prompt_ids(request)
        fit_to_context(request, len(ids), self.context_length)
        return ids

    def prompt_ids(self, request: CompletionRequest) -> list[int]:
        """The request's prompt as token ids; raises APIError (400) for an unknown model or a
        prompt the chat template refuses."""
        if request.model not in self.models:
            raise APIError(
                404,
                f"the model {request.model!r} does not exist; this server has "
                f"{', '.join(map(repr, self.models))} (GET /v1/models lists them).",
                param="model",
                code="model_not_found",
            )
        if isinstance(request.prompt, list) and request.prompt and not request.chat:
            vocab = self.tokenizer.vocab_size
            if max(request.prompt) >= vocab:
                raise APIError(400, f"prompt token ids must be below {vocab}", param="prompt")
            return request.prompt
        try:
            ids = encode_prompt(self.tokenizer, request.prompt, chat=request.chat)
        except OndeviceLoraError as e:
            raise APIError(400, str(e), param="messages" if request.chat else "prompt") from None
        if not ids:
            raise APIError(400, "the prompt encodes to no tokens", param="prompt")
        return ids

    async def generate(
        self,
        request: CompletionRequest,
        ids: list[int],
        disconnected: asyncio.Event | None = None,
    ) -> AsyncIterator:
        """Queue the request; yield its text pieces, then one Finished (see `events`)."""
        job = self.submit(request, ids)
        async for event in self.events(job, disconnected):
            yield event

    def submit(self, request: CompletionRequest, ids: list[int]) -> _Job:
        """Queue the request for the worker; raises APIError 503 when the queue is full."""
        self._admission.admit()
        job = _Job(asyncio.get_running_loop(), time.monotonic() + self.limits.request_timeout)
        try:
            self._worker.submit(self._run, request, ids, job)
        except RuntimeError:  # the executor is shut down: the server is stopping
            self._admission.release()
            raise APIError(503, "the server is shutting down", type="server_error") from None
        return job

    async def events(self, job: _Job, disconnected: asyncio.Event | None = None) -> AsyncIterator:
        """A submitted job's text pieces, then one Finished.

        Raises APIError 504 past the time limit, and ClientGone once `disconnected` is set;
        each of these (and leaving early) stops the generation.
        """
        watcher = None
        if disconnected is not None:
            watcher = asyncio.ensure_future(_forward_disconnect(disconnected, job))
        try:
            while True:
                event = await self._next_event(job)
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            job.cancel()  # the client left early (or we are done): stop generating
            if watcher is not None:
                watcher.cancel()

    async def _next_event(self, job: _Job):
        remaining = job.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(job.queue.get(), timeout=max(remaining, 0))
        except TimeoutError:
            raise APIError(
                504,
                f"the request took longer than {self.limits.request_timeout:g} s "
                "(--request-timeout), waiting and generating; ask for fewer tokens or retry.",
                code="timeout",
            ) from None

    def _run(self, request: CompletionRequest, ids: list[int], job: _Job) -> None:
        started = time.monotonic()
        try:
            if self._closing.is_set():
                job.emit(APIError(503, "the server is shutting down", type="server_error"))
            elif job.cancelled.is_set():
                self.stats.cancelled += 1  # left while queued: nothing to stop
            else:
                self._answer(request, ids, job)
        except Exception as e:  # a bug: reported to this request, the server keeps serving
            job.emit(e)
        finally:
            self.stats.job_seconds.append(time.monotonic() - started)
            self._admission.release()

    def _note_cancelled(self, job: _Job, step: float) -> None:
        """A generation stopped midway: how long after its cancellation the worker let go, and
        how long the model step it was in took (the prompt's, for the first token)."""
        self.stats.cancelled += 1
        lag = time.monotonic() - (job.cancelled_at or time.monotonic())
        self.stats.release_lags.append((lag, step))

    def _answer(self, request: CompletionRequest, ids: list[int], job: _Job) -> None:
        """Generate on the worker, checking for cancellation after every token."""
        adapter = self.models[request.model]
        if len(self.models) > 1:
            set_active(self.model, adapter)
        detokenizer = StreamingDetokenizer(self.tokenizer)
        matcher = StopMatcher(request.stop)
        eos_ids = self.tokenizer.eos_token_ids
        tokens, reason = 0, None
        last = time.perf_counter()
        for token_id in generate_tokens(self.model, ids, request.sampling, eos_ids):
            now = time.perf_counter()
            step, last = now - last, now
            if tokens:  # the first token's time is the prompt's, not a decode step
                self.stats.step_seconds.append(step)
            tokens += 1
            if time.monotonic() > job.deadline:
                job.cancel()  # the request's side answers 504; this holds even if it stalled
            if job.cancelled.is_set() or self._closing.is_set():
                self._note_cancelled(job, step)
                return
            text, stopped = matcher.feed(detokenizer.add_token(token_id))
            if text:
                job.emit(text)
            if stopped:
                reason = "stop"
                break
        if reason is None:
            text, stopped = matcher.feed(detokenizer.finish())
            if rest := text + ("" if stopped else matcher.finish()):
                job.emit(rest)
            reason = "length" if tokens >= request.sampling.max_tokens and not stopped else "stop"
        self.stats.completed += 1
        job.emit(Finished(reason, len(ids), tokens))


async def _forward_disconnect(disconnected: asyncio.Event, job: _Job) -> None:
    """Once the client is gone: stop the worker on this job, and wake the request's loop."""
    await disconnected.wait()
    job.cancel()
    job.queue.put_nowait(ClientGone())
