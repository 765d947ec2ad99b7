"""The core's exceptions. The core raises these; the servicers map them to gRPC status codes in one place
(`server.servicers.status`), so that a second front (the Open Inference Protocol) can map them its own way."""

from __future__ import annotations

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
