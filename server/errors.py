"""The core's exceptions. The core raises these; the servicers map them to gRPC status codes in one place
(`server.servicers.status`), so that a second front (the Open Inference Protocol) can map them its own way."""

from __future__ import annotations

import json
from typing import Any

SHOWN_CHARACTERS = 64


def shown(text: str, limit: int = SHOWN_CHARACTERS) -> str:
    """`text` quoted for a message, cut to `limit` characters: never echo unbounded input (a 9 KB model name no
    longer fits the client's metadata limit, and the client would see RESOURCE_EXHAUSTED instead of the error)."""
    quoted = repr(text[:limit])
    if len(quoted) > 2 * limit:  # escapes (control or unassigned characters) can widen a character tenfold
        quoted = quoted[: 2 * limit] + "'"
    if len(text) <= limit and len(quoted) == len(repr(text)):
        return quoted
    return f"{quoted}... ({len(text)} characters)"


def shown_number(value: float) -> str:
    """A number from the request for a message: JSON allows integers of thousands of digits, a message shows at
    most 40 characters of one."""
    text = str(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads_json(text: str | bytes, field: str) -> Any:
    """Parses JSON from a client; anything it cannot take (bad syntax or UTF-8, NaN or Infinity, nesting too deep
    for the parser) is InvalidInput naming `field`."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise InvalidInput(field, f"not valid JSON ({exc.msg} at position {exc.pos})") from None
    except (ValueError, RecursionError) as exc:  # invalid UTF-8, NaN, nesting too deep
        raise InvalidInput(field, f"not valid JSON ({type(exc).__name__})") from None


class ServeError(Exception):
    """Base of every error the core raises on purpose; its message is safe to show to the client."""


class InvalidInput(ServeError, ValueError):
    """The request is malformed; the message names the field (``texts[2]: empty``)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class ModelNotFound(ServeError, LookupError):
    """No model of that name (or no model of the asked kind)."""


class Overloaded(ServeError):
    """A bounded queue is full; the client should back off and retry."""


class Unavailable(ServeError):
    """The server is draining, or the model is not ready yet."""


class DeadlineExceeded(ServeError):
    """The request's deadline passed before its work was done (for instance while it was queued)."""


class OutOfMemory(ServeError):
    """ONNX Runtime could not allocate memory for this batch (host or device); the model serves on."""


class DeviceLost(ServeError):
    """The model's device (GPU) failed in a way that leaves it unusable; the model stops serving."""


class ModelFailure(ServeError):
    """The model computed something unusable for this request (NaN logits); the message says what."""


class StartupError(Exception):
    """The server cannot start (no models, an execution provider that is not active...); the message says why."""
