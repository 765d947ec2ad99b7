"""The one exception the client raises for a failed call."""

from __future__ import annotations

import grpc


class ServerError(Exception):
    """A call failed: the server answered with an error status, or could not be reached.

    Attributes:
        code: The gRPC status code, e.g. `grpc.StatusCode.NOT_FOUND`; UNAVAILABLE when the server cannot be
            reached, DEADLINE_EXCEEDED when the call's timeout passed.
        details: The message that goes with the code (from the server, or from gRPC for transport errors).
    """

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        # One line: gRPC's transport messages can span several, and this is what the CLI prints.
        self.code = code
        self.details = " ".join((details or "").split())
        super().__init__(f"{code.name}: {self.details}" if self.details else code.name)

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ServerError:
        """Wraps the error that a grpc call raised (sync or `grpc.aio`)."""
        code = error.code() if hasattr(error, "code") else None
        details = error.details() if hasattr(error, "details") else None
        if not isinstance(code, grpc.StatusCode):
            code = grpc.StatusCode.UNKNOWN
        # No fallback to str(error): for a call it is a multi-line repr, not a message.
        return cls(code, details or "")
