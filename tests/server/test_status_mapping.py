"""The one mapping from core exceptions to gRPC status codes (a pure function; no server)."""

from __future__ import annotations

import grpc
import pytest

from server.errors import DeadlineExceeded, InvalidInput, ModelNotFound, Overloaded, Unavailable
from server.servicers.status import INTERNAL_MESSAGE, status_of


@pytest.mark.parametrize(
    "exc, code",
    [
        (InvalidInput("parameters.top_p", "2.0, must be in (0, 1]"), grpc.StatusCode.INVALID_ARGUMENT),
        (ModelNotFound("no model named 'x'"), grpc.StatusCode.NOT_FOUND),
        (Overloaded("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Unavailable("draining"), grpc.StatusCode.UNAVAILABLE),
        (DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
    ],
)
def test_core_errors_keep_their_message(exc, code):
    assert status_of(exc) == (code, str(exc))


def test_invalid_input_message_starts_with_the_field():
    assert str(InvalidInput("texts[2]", "empty text")) == "texts[2]: empty text"


@pytest.mark.parametrize("exc", [RuntimeError("secret /path/to/model"), KeyError("x"), ValueError("inner")])
def test_anything_else_is_internal_with_a_generic_message(exc):
    code, message = status_of(exc)
    assert code is grpc.StatusCode.INTERNAL and message == INTERNAL_MESSAGE
    assert str(exc) not in message
