"""The one place where the core's exceptions become gRPC status codes, and where every RPC is counted.

An unexpected exception becomes INTERNAL with a generic message; its traceback goes to the log, never to the
client. Each RPC method is wrapped once (`unary` / `stream` / `bidi`), so servicer methods hold no
try/except. Nothing here knows a front's messages: nlpserve.v1 and the Open Inference Protocol both use it.
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
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from ..errors import (
    DeadlineExceeded,
    DeviceLost,
    InvalidInput,
    ModelFailure,
    ModelNotFound,
    OutOfMemory,
    Overloaded,
    ServeError,
    Unavailable,
)
from ..metrics import Metrics

log = logging.getLogger(__name__)

class StreamUnread(ServeError):
    """The client of a stream read nothing for too long (its sequence is cancelled, its slot freed)."""


CODES: dict[type[ServeError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    OutOfMemory: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeviceLost: grpc.StatusCode.UNAVAILABLE,
    ModelFailure: grpc.StatusCode.INTERNAL,
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
    """What one RPC learns as it runs: the model it resolved (a metric label) and its deadline. A servicer may
    set `on_finish(ok, seconds)`, told once how the call ended (a front's own statistics)."""

    method: str
    model: str = ""
    deadline: float | None = None  # time.monotonic() seconds
    on_finish: Callable[[bool, float], None] | None = None


class Gate:
    """Admission during a drain, and the count of RPCs in flight that a drain waits for."""

    def __init__(self) -> None:
        # True from the stop signal on: readiness checks say no while calls are still admitted
        # (--drain-delay-seconds), so that load balancers move away before `draining` refuses calls.
        self.stopping = False
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> bool:
        """Admits one RPC (True), or raises Unavailable while draining."""
        if self.draining:
            raise Unavailable("the server is shutting down")
        self.in_flight += 1
        self._idle.clear()
        return True

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
    seconds = time.monotonic() - started
    metrics.requests.labels(call.model, call.method, code.name).inc()
    metrics.request_duration.labels(call.model, call.method, code.name).observe(seconds)
    if call.on_finish is not None:
        call.on_finish(code is grpc.StatusCode.OK, seconds)


def _cancelled_code(call: Call) -> grpc.StatusCode:
    if call.deadline is not None and time.monotonic() >= call.deadline:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _log_unexpected(call: Call, exc: BaseException) -> None:
    if not isinstance(exc, ServeError):
        log.error("%s (model %r) failed", call.method, call.model, exc_info=exc)


def unary(method: str, request_type: type[Message], gated: bool = True) -> Callable:
    """Wraps a unary servicer method ``f(self, request, context, call)``: admission, parsing, metrics, error
    mapping. The handler receives the request's raw bytes (see `add_to_server`). `gated=False`: answered
    during a drain too, and not waited for (health-like calls that say the server is going away)."""

    def wrap(f: Callable[..., Awaitable[Any]]) -> Callable:
        @functools.wraps(f)
        async def handler(self: Any, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
            started = time.monotonic()
            call = _start(method, context)
            admitted = False
            try:
                request = await _receive(requests, request_type)  # a malformed call is refused as such
                admitted = gated and self.gate.enter()
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
                if admitted:
                    self.gate.leave()

        return handler

    return wrap


async def _receive(requests: AsyncIterator[bytes], request_type: type[Message]) -> Message:
    """The call's one request message, parsed here rather than by gRPC: gRPC answers a message that does not
    parse (invalid UTF-8 in a string, truncated bytes) with UNKNOWN and a traceback, uncounted, and a call whose
    client half-closes without any message with no status at all."""
    # gRPC's request iterator is an async generator that its receiver object holds and that holds the receiver
    # (a reference cycle): left suspended, its frame keeps the last message's bytes until a full garbage collection.
    messages = aiter(requests)
    try:
        raw = await anext(messages, None)
    finally:
        await messages.aclose()
    if raw is None:
        raise InvalidInput("request", "no request message (the client half-closed the call without one)")
    return _parse(raw, request_type)


def _parse(raw: bytes, request_type: type[Message]) -> Message:
    try:
        return request_type.FromString(raw)
    except DecodeError as exc:
        raise InvalidInput("request", f"not a valid {request_type.DESCRIPTOR.name}: {exc}") from None


async def _fail(
    servicer: Any, call: Call, context: grpc.aio.ServicerContext, exc: Exception, started: float
) -> None:
    """Ends the call with the status `exc` maps to (counted; an unexpected error is logged)."""
    code, message = status_of(exc)
    _log_unexpected(call, exc)
    # Logged: the traceback's frames (which hold the request) would otherwise live on in a reference cycle
    # through the abort's exception context until the next full garbage collection.
    exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    _finish(servicer.metrics, call, code, started)
    await context.abort(code, message)


def stream(method: str, request_type: type[Message]) -> Callable:
    """Wraps a server-streaming servicer method (an async generator ``f(self, request, context, call)``); its
    messages are written here, each within the servicer's `unread_timeout` seconds."""

    def wrap(f: Callable[..., AsyncIterator[Any]]) -> Callable:
        @functools.wraps(f)
        async def handler(self: Any, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
            started = time.monotonic()
            call = _start(method, context)
            admitted = False
            try:
                request = await _receive(requests, request_type)  # first, as in `unary`
                admitted = self.gate.enter()
                # aclosing: when the client goes away, the inner generators close now (and cancel their
                # sequence), not whenever the garbage collector finalizes them.
                async with contextlib.aclosing(f(self, request, context, call)) as messages:
                    async for message in messages:
                        await _write(context, message, self.unread_timeout)
            except StreamUnread as exc:
                # Not abort(): its status would wait behind the unread messages, and so would this handler.
                # gRPC sends the status set here after the handler returns, when the client reads (or never:
                # stopping the server cancels the call).
                log.info("%s (model %r): %s; the stream ends", method, call.model, exc)
                _finish(self.metrics, call, grpc.StatusCode.RESOURCE_EXHAUSTED, started)
                context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
                context.set_details(str(exc))
            except asyncio.CancelledError:  # the client went away (or its deadline passed)
                _finish(self.metrics, call, _cancelled_code(call), started)
                raise
            except Exception as exc:  # noqa: BLE001 - the one mapping of errors to status codes
                await _fail(self, call, context, exc, started)
            else:
                _finish(self.metrics, call, grpc.StatusCode.OK, started)
            finally:
                if admitted:
                    self.gate.leave()

        return handler

    return wrap


_END = object()  # ends a `bidi` stream's queue of messages


def bidi(method: str, request_type: type[Message], failed: Callable[[Message | None, str], Message]) -> Callable:
    """Wraps a bidirectional-streaming method whose request messages are calls of their own (Triton's
    ModelStreamInfer): the async generator ``f(self, request, context, call)`` runs for each request message
    as it arrives, concurrently with the others, and their messages share the one response stream. Each
    request is admitted, counted and has its error mapped like a unary call, but in the stream: a request that
    fails gets the message ``failed(request or None, client-safe message)`` and the stream goes on. The call
    ends OK once the client half-closed and every request was answered; a client that reads nothing for the
    servicer's `unread_timeout` seconds ends it with RESOURCE_EXHAUSTED, as in `stream`."""

    def wrap(f: Callable[..., AsyncIterator[Any]]) -> Callable:
        @functools.wraps(f)
        async def handler(self: Any, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
            # Unbounded: each request's messages come at the pace of its model; a client that stops reading
            # is ended by the write timeout, like any stream.
            out: asyncio.Queue = asyncio.Queue()
            answering: set[asyncio.Task] = set()

            async def answer(raw: bytes) -> None:
                started = time.monotonic()
                call = _start(method, context)
                request, admitted = None, False
                try:
                    request = _parse(raw, request_type)
                    admitted = self.gate.enter()
                    async with contextlib.aclosing(f(self, request, context, call)) as messages:
                        async for message in messages:
                            out.put_nowait(message)
                except asyncio.CancelledError:
                    _finish(self.metrics, call, _cancelled_code(call), started)
                    raise
                except Exception as exc:  # noqa: BLE001 - the one mapping of errors, in the stream
                    code, text = status_of(exc)
                    _log_unexpected(call, exc)
                    exc.__traceback__ = exc.__context__ = exc.__cause__ = None
                    _finish(self.metrics, call, code, started)
                    out.put_nowait(failed(request, text))
                else:
                    _finish(self.metrics, call, grpc.StatusCode.OK, started)
                finally:
                    if admitted:
                        self.gate.leave()

            async def read() -> None:
                messages = aiter(requests)
                try:
                    async for raw in messages:
                        task = asyncio.ensure_future(answer(raw))
                        answering.add(task)
                        task.add_done_callback(answering.discard)
                finally:
                    await messages.aclose()  # see _receive
                while answering:
                    await asyncio.wait(set(answering))

            reader = asyncio.ensure_future(read())
            reader.add_done_callback(lambda _: out.put_nowait(_END))
            try:
                while (message := await out.get()) is not _END:
                    await _write(context, message, self.unread_timeout)
                await reader  # raises what reading raised, if anything
            except StreamUnread as exc:
                log.info("%s: %s; the stream ends", method, exc)
                context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
                context.set_details(str(exc))
            finally:
                # The client went away (or stopped reading): its requests still running are cancelled, which
                # cancels their work in the core.
                for task in (reader, *answering):
                    task.cancel()
                await asyncio.gather(reader, *answering, return_exceptions=True)

        return handler

    return wrap


async def _write(context: grpc.aio.ServicerContext, message: Message, timeout: float) -> None:
    """Sends one message of a stream. A client that stops reading fills the HTTP/2 window, and the write then
    waits: past `timeout` the stream ends, so that an unread stream holds neither a sequence slot nor a
    graceful stop for long."""
    try:
        async with asyncio.timeout(timeout):  # no task per message, unlike wait_for
            await context.write(message)
    except TimeoutError:
        raise StreamUnread(f"the client read nothing for {timeout:g}s") from None


def add_to_server(servicer: Any, service: ServiceDescriptor, server: grpc.aio.Server) -> None:
    """Registers the methods of `service` that `servicer` wraps with `unary` / `stream` / `bidi`. Every method
    takes its requests as raw bytes on a client-streaming handler (the wire does not tell unary from
    client-streaming), so that `_receive` decides what a missing or malformed message gets."""
    handlers = {}
    for method in service.methods:
        fn = getattr(servicer, method.name)
        response_type = message_factory.GetMessageClass(method.output_type)
        if method.server_streaming:
            handler = grpc.stream_stream_rpc_method_handler(fn, response_serializer=response_type.SerializeToString)
        else:
            handler = grpc.stream_unary_rpc_method_handler(fn, response_serializer=response_type.SerializeToString)
        handlers[method.name] = handler
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
