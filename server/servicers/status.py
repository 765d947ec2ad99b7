"""The one place where the core's exceptions become gRPC status codes, and where every RPC is counted.

An unexpected exception becomes INTERNAL with a generic message; its traceback goes to the log, never to the
client. Each RPC method is wrapped once (`unary` / `stream`), so servicer methods hold no try/except.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from ..errors import DeadlineExceeded, InvalidInput, ModelNotFound, Overloaded, ServeError, Unavailable
from ..metrics import Metrics

log = logging.getLogger(__name__)

CODES: dict[type[ServeError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
INTERNAL_MESSAGE = "internal error (the server log has the details)"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-safe message for an exception raised while serving a request."""
    for kind, code in CODES.items():
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


@dataclass
class Call:
    """What one RPC learns as it runs: the model it resolved (a metric label) and its deadline."""

    method: str
    model: str = ""
    deadline: float | None = None  # time.monotonic() seconds


class Gate:
    """Admission during a drain, and the count of RPCs in flight that a drain waits for."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        if self.draining:
            raise Unavailable("the server is shutting down")
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True when every RPC finished within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False


def _start(method: str, context: grpc.aio.ServicerContext) -> Call:
    remaining = context.time_remaining()
    return Call(method, deadline=time.monotonic() + remaining if remaining is not None else None)


def _finish(metrics: Metrics, call: Call, code: grpc.StatusCode, started: float) -> None:
    metrics.requests.labels(call.model, call.method, code.name).inc()
    if code is grpc.StatusCode.OK:
        metrics.request_duration.labels(call.model, call.method).observe(time.monotonic() - started)


def _cancelled_code(call: Call) -> grpc.StatusCode:
    if call.deadline is not None and time.monotonic() >= call.deadline:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _log_unexpected(call: Call, exc: BaseException) -> None:
    if not isinstance(exc, ServeError):
        log.error("%s (model %r) failed", call.method, call.model, exc_info=exc)


def unary(method: str) -> Callable:
    """Wraps a unary servicer method ``f(self, request, context, call)``: admission, metrics, error mapping."""

    def wrap(f: Callable[..., Awaitable[Any]]) -> Callable:
        @functools.wraps(f)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.monotonic()
            call = _start(method, context)
            await _enter(self, call, context, started)
            try:
                response = await f(self, request, context, call)
            except asyncio.CancelledError:
                _finish(self.metrics, call, _cancelled_code(call), started)
                raise
            except Exception as exc:  # noqa: BLE001 - the one mapping of errors to status codes
                await _fail(self, call, context, exc, started)
            else:
                _finish(self.metrics, call, grpc.StatusCode.OK, started)
                return response
            finally:
                self.gate.leave()

        return handler

    return wrap


async def _enter(servicer: Any, call: Call, context: grpc.aio.ServicerContext, started: float) -> None:
    """Admits the call through the drain gate, or ends it with UNAVAILABLE (counted)."""
    try:
        servicer.gate.enter()
    except Unavailable as exc:
        _finish(servicer.metrics, call, grpc.StatusCode.UNAVAILABLE, started)
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))


async def _fail(
    servicer: Any, call: Call, context: grpc.aio.ServicerContext, exc: Exception, started: float
) -> None:
    """Ends the call with the status `exc` maps to (counted; an unexpected error is logged)."""
    code, message = status_of(exc)
    _log_unexpected(call, exc)
    _finish(servicer.metrics, call, code, started)
    await context.abort(code, message)


def stream(method: str) -> Callable:
    """Wraps a server-streaming servicer method (an async generator ``f(self, request, context, call)``)."""

    def wrap(f: Callable[..., AsyncIterator[Any]]) -> Callable:
        @functools.wraps(f)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.monotonic()
            call = _start(method, context)
            await _enter(self, call, context, started)
            try:
                # aclosing: when the client goes away, the inner generators close now (and cancel their
                # sequence), not whenever the garbage collector finalizes them.
                async with contextlib.aclosing(f(self, request, context, call)) as messages:
                    async for message in messages:
                        yield message
            except (asyncio.CancelledError, GeneratorExit):  # the client went away (or its deadline passed)
                _finish(self.metrics, call, _cancelled_code(call), started)
                raise
            except Exception as exc:  # noqa: BLE001 - the one mapping of errors to status codes
                await _fail(self, call, context, exc, started)
            else:
                _finish(self.metrics, call, grpc.StatusCode.OK, started)
            finally:
                self.gate.leave()

        return handler

    return wrap
