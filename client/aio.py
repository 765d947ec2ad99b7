"""The asyncio client (`grpc.aio`)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from . import _requests as req
from .errors import ServerError
from .proto import inference_pb2 as pb
from .proto import inference_pb2_grpc as pb_grpc
from .sync import Pem, auth_metadata, channel_credentials, channel_options
from .types import ClassifyResult, EmbedResult, Generation, GenerationChunk, ModelInfo, TokenClassifyResult

if TYPE_CHECKING:
    from typing import Self


class AsyncClient:
    """An asyncio client of an nlpserve server, on `grpc.aio`.

    The same methods as `Client`, as coroutines; `generate_stream` is an async iterator. The channel opens at
    the first call, in the event loop that makes it (so the client may be created before the loop runs); use
    the client in that loop only, and close it with `await close()` or `async with`.

    Example:
        >>> from client import AsyncClient
        >>> async def main():
        ...     async with AsyncClient("127.0.0.1:50051") as c:
        ...         result = await c.classify(["a fine film", "a dull film"])
        ...         async for chunk in c.generate_stream("Return the", max_new_tokens=16):
        ...             print(chunk.text, end="", flush=True)

    Args:
        target: The server's address, "HOST:PORT".
        timeout: The default deadline of every call, in seconds; None waits as long as the call takes.
        channel: An existing `grpc.aio.Channel` to use instead of opening one; it is not closed by `close()`.
        options: gRPC channel options, e.g. `[("grpc.max_receive_message_length", 64 << 20)]`.
        tls_ca, tls_cert, tls_key, tls, tls_server_name, api_key: TLS, mTLS and the API key, as for `Client`
            (the files are read at once).
    """

    def __init__(
        self,
        target: str = req.DEFAULT_TARGET,
        timeout: float | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        options: Sequence[tuple[str, Any]] = (),
        tls_ca: Pem | None = None,
        tls_cert: Pem | None = None,
        tls_key: Pem | None = None,
        tls: bool = False,
        tls_server_name: str | None = None,
        api_key: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata = auth_metadata(api_key)
        self._credentials = channel_credentials(tls, tls_ca, tls_cert, tls_key)
        self._own_channel = channel is None
        self._options = channel_options(options, tls_server_name)
        self._channel: grpc.aio.Channel | None = None
        if channel is not None:
            self._connect(channel)

    def _connect(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._inference = pb_grpc.InferenceServiceStub(channel)
        self._health = channel.unary_unary(
            req.HEALTH_CHECK_METHOD,
            request_serializer=req.HealthCheckRequest.SerializeToString,
            response_deserializer=req.HealthCheckResponse.FromString,
        )

    def _connected(self) -> None:
        # A grpc.aio channel belongs to the event loop it is created in: create it in the running loop.
        if self._channel is None:
            if self._credentials is not None:
                self._connect(grpc.aio.secure_channel(self.target, self._credentials, options=self._options))
            else:
                self._connect(grpc.aio.insecure_channel(self.target, options=self._options))

    @property
    def _stub(self) -> pb_grpc.InferenceServiceStub:
        self._connected()
        return self._inference

    @property
    def _health_check(self) -> grpc.aio.UnaryUnaryMultiCallable:
        self._connected()
        return self._health

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channel (unless it was passed in); calls in flight are cancelled."""
        if self._own_channel and self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is req.USE_CLIENT_TIMEOUT else timeout

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise ServerError.from_rpc_error(e) from e

    async def classify(
        self,
        texts: str | Iterable[str],
        model: str | None = None,
        return_embedding: bool = False,
        no_truncation: bool = False,
        *,
        timeout: float | None = req.USE_CLIENT_TIMEOUT,
    ) -> ClassifyResult:
        """Classifies one or many texts. See `Client.classify`.

        Raises:
            ServerError: When the call fails; `code` says why.
        """
        request = req.classify_request(texts, model, return_embedding, no_truncation)
        response = await self._call(self._stub.Classify, request, timeout)
        return ClassifyResult.from_pb(response, with_embedding=return_embedding)

    async def embed(
        self,
        texts: str | Iterable[str],
        model: str | None = None,
        dimensions: int | None = None,
        no_truncation: bool = False,
        *,
        timeout: float | None = req.USE_CLIENT_TIMEOUT,
    ) -> EmbedResult:
        """Embeds one or many texts with a sentence-embedding model. See `Client.embed`."""
        request = req.embed_request(texts, model, dimensions, no_truncation)
        return EmbedResult.from_pb(await self._call(self._stub.Embed, request, timeout))

    async def classify_tokens(
        self,
        texts: str | Iterable[str],
        model: str | None = None,
        aggregation: str = "simple",
        no_truncation: bool = False,
        *,
        timeout: float | None = req.USE_CLIENT_TIMEOUT,
    ) -> TokenClassifyResult:
        """Finds the entities of one or many texts with a token classifier. See `Client.classify_tokens`."""
        request = req.classify_tokens_request(texts, model, aggregation, no_truncation)
        return TokenClassifyResult.from_pb(await self._call(self._stub.ClassifyTokens, request, timeout))

    async def generate(
        self,
        prompt: str,
        model: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        logprobs: bool = False,
        *,
        timeout: float | None = req.USE_CLIENT_TIMEOUT,
    ) -> Generation:
        """Generates a continuation of a prompt and returns it whole. See `Client.generate`.

        Raises:
            ServerError: When the call fails; `code` says why.
        """
        request = req.generate_request(
            prompt, model, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, logprobs
        )
        return Generation.from_pb(await self._call(self._stub.Generate, request, timeout))

    async def generate_stream(
        self,
        prompt: str,
        model: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: Sequence[str] = (),
        logprobs: bool = False,
        *,
        timeout: float | None = req.USE_CLIENT_TIMEOUT,
    ) -> AsyncIterator[GenerationChunk]:
        """Generates a continuation of a prompt, piece by piece. See `Client.generate_stream`.

        Use it with `async for`. Leaving the loop early and closing the iterator (`aclose()`, or
        `contextlib.aclosing`) cancels the call, and the server frees the sequence's slot.

        Yields:
            `GenerationChunk`s, in order; the last carries the finish reason, token counts and timings.

        Raises:
            ServerError: When the call fails; `code` says why.
        """
        request = req.generate_request(
            prompt, model, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, logprobs
        )
        async with contextlib.aclosing(self._stream(request, timeout)) as chunks:  # closing this closes that
            async for chunk in chunks:
                yield chunk

    async def chat(
        self,
        messages: Sequence[tuple[str, str] | Mapping[str, str]],
        model: str | None = None,
        *,
        timeout: float | None = req.USE_CLIENT_TIMEOUT,
        **params: Any,
    ) -> Generation:
        """Answers a conversation with the model's chat template. See `Client.chat`."""
        request = req.chat_request(messages, model, **params)
        return Generation.from_pb(await self._call(self._stub.Generate, request, timeout))

    async def chat_stream(
        self,
        messages: Sequence[tuple[str, str] | Mapping[str, str]],
        model: str | None = None,
        *,
        timeout: float | None = req.USE_CLIENT_TIMEOUT,
        **params: Any,
    ) -> AsyncIterator[GenerationChunk]:
        """Answers a conversation piece by piece. See `Client.chat_stream`."""
        async with contextlib.aclosing(self._stream(req.chat_request(messages, model, **params), timeout)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _stream(self, request: Any, timeout: float | None) -> AsyncIterator[GenerationChunk]:
        call = self._stub.GenerateStream(request, timeout=self._timeout(timeout), metadata=self._metadata)
        try:
            async for message in call:
                yield GenerationChunk.from_pb(message)
        except grpc.RpcError as e:
            raise ServerError.from_rpc_error(e) from e
        finally:
            call.cancel()

    async def list_models(self, *, timeout: float | None = req.USE_CLIENT_TIMEOUT) -> list[ModelInfo]:
        """Lists the models the server hosts. See `Client.list_models`."""
        response = await self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [ModelInfo.from_pb(m) for m in response.models]

    async def get_model(self, name: str, *, timeout: float | None = req.USE_CLIENT_TIMEOUT) -> ModelInfo:
        """Describes one model (NOT_FOUND when unknown). See `Client.get_model`."""
        return ModelInfo.from_pb(
            await self._call(self._stub.GetModel, pb.GetModelRequest(name=name), timeout)
        )

    async def health(self, service: str = "", *, timeout: float | None = req.USE_CLIENT_TIMEOUT) -> str:
        """The standard gRPC health status of the server ("") or of a model. See `Client.health`."""
        response = await self._call(self._health_check, req.HealthCheckRequest(service=service), timeout)
        return req.health_status_name(response)
