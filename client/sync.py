"""The synchronous client."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from . import _requests as req
from .errors import ServerError
from .proto import inference_pb2 as pb
from .proto import inference_pb2_grpc as pb_grpc
from .types import ClassifyResult, EmbedResult, Generation, GenerationChunk, ModelInfo, TokenClassifyResult

if TYPE_CHECKING:
    from typing import Self

API_KEY_ENV = "NLPSERVE_API_KEY"

# A PEM file's path, or its contents.
Pem = str | os.PathLike[str] | bytes


def read_pem(value: Pem, what: str) -> bytes:
    """The PEM data of `value` (a path, or the bytes themselves). Raises OSError (unreadable file) or ValueError
    (no PEM data), naming `what`."""
    data = bytes(value) if isinstance(value, bytes | bytearray) else Path(value).read_bytes()
    if b"-----BEGIN " not in data:
        source = "the bytes given" if isinstance(value, bytes | bytearray) else str(value)
        raise ValueError(f"{what}: no PEM data in {source}")
    return data


def channel_credentials(
    tls: bool, tls_ca: Pem | None, tls_cert: Pem | None, tls_key: Pem | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials (None: a plaintext channel). Any of the files turns TLS on; `tls` alone trusts the
    system's root certificates."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key go together (a client certificate and its key)")
    if not (tls or tls_ca is not None or tls_cert is not None):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls_ca, "tls_ca") if tls_ca is not None else None,
        private_key=read_pem(tls_key, "tls_key") if tls_key is not None else None,
        certificate_chain=read_pem(tls_cert, "tls_cert") if tls_cert is not None else None,
    )


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata every call carries: `authorization: Bearer KEY` (None: $NLPSERVE_API_KEY, if set)."""
    key = os.environ.get(API_KEY_ENV, "") if api_key is None else api_key
    if not key:
        return ()
    if not all("!" <= c <= "~" for c in key):  # what gRPC metadata and "Bearer KEY" can carry
        raise ValueError("api_key: must be printable ASCII without spaces")
    return (("authorization", f"Bearer {key}"),)


def channel_options(options: Sequence[tuple[str, Any]], tls_server_name: str | None) -> list[tuple[str, Any]]:
    # The name the server's certificate must hold, when it differs from the target's host (an IP address, a
    # name inside a container network).
    extra = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
    return [*options, *extra]


class Client:
    """A synchronous client of an nlpserve server.

    A context manager; the channel is opened at once and closed by `close()` or on leaving the `with` block.
    Every failed call raises `ServerError`, whose `code` is the gRPC status code.

    Example:
        >>> from client import Client
        >>> with Client("127.0.0.1:50051") as c:
        ...     print(c.classify(["a fine film"])[0].label)
        ...     for chunk in c.generate_stream("Return the", max_new_tokens=16):
        ...         print(chunk.text, end="", flush=True)

    Args:
        target: The server's address, "HOST:PORT".
        timeout: The default deadline of every call, in seconds; None waits as long as the call takes.
        channel: An existing channel to use instead of opening one (custom credentials or options); it is
            not closed by `close()`. The TLS arguments do not apply to it; `api_key` does.
        options: gRPC channel options, e.g. `[("grpc.max_receive_message_length", 64 << 20)]`.
        tls_ca: TLS: the CA certificate(s) that signed the server's certificate, PEM (a path, or the bytes).
            Any TLS argument turns TLS on.
        tls_cert: mTLS: the client's certificate chain, PEM (a path or the bytes); with `tls_key`.
        tls_key: mTLS: the private key of `tls_cert`, PEM (a path or the bytes).
        tls: TLS trusting the system's root certificates (no `tls_ca` needed).
        tls_server_name: The name to check the server's certificate against, when it is not the target's host.
        api_key: Sent as `authorization: Bearer KEY` with every call. None (the default) takes the environment
            variable NLPSERVE_API_KEY when it is set; "" sends no key.

    Raises:
        OSError: A TLS file cannot be read.
        ValueError: A TLS argument holds no PEM data, `tls_cert` comes without `tls_key` (or the reverse), or
            the API key cannot be sent (not printable ASCII, or with spaces).
    """

    def __init__(
        self,
        target: str = req.DEFAULT_TARGET,
        timeout: float | None = None,
        *,
        channel: grpc.Channel | None = None,
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
        credentials = channel_credentials(tls, tls_ca, tls_cert, tls_key)
        self._own_channel = channel is None
        if channel is None:
            opts = channel_options(options, tls_server_name)
            channel = (
                grpc.secure_channel(target, credentials, options=opts)
                if credentials is not None
                else grpc.insecure_channel(target, options=opts)
            )
        self._channel = channel
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._health_check = self._channel.unary_unary(
            req.HEALTH_CHECK_METHOD,
            request_serializer=req.HealthCheckRequest.SerializeToString,
            response_deserializer=req.HealthCheckResponse.FromString,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel (unless it was passed in); calls in flight are cancelled."""
        if self._own_channel:
            self._channel.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is req.USE_CLIENT_TIMEOUT else timeout

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise ServerError.from_rpc_error(e) from e

    def classify(
        self,
        texts: str | Iterable[str],
        model: str | None = None,
        return_embedding: bool = False,
        no_truncation: bool = False,
        *,
        timeout: float | None = req.USE_CLIENT_TIMEOUT,
    ) -> ClassifyResult:
        """Classifies one or many texts.

        Args:
            texts: The texts (a single string is one text).
            model: The classifier; None selects the only classifier the server hosts.
            return_embedding: Also return each text's pooled sentence vector (`Classification.embedding`).
            no_truncation: Fail with INVALID_ARGUMENT on a text longer than the model's limit, instead of
                truncating it (and flagging it `truncated`).
            timeout: This call's deadline in seconds; left out, the client's default.

        Returns:
            One `Classification` per text, in order.

        Raises:
            ServerError: INVALID_ARGUMENT (no text, an empty text, too many texts...), NOT_FOUND (unknown
                model), RESOURCE_EXHAUSTED (the server's queue is full), UNAVAILABLE, DEADLINE_EXCEEDED...
        """
        request = req.classify_request(texts, model, return_embedding, no_truncation)
        response = self._call(self._stub.Classify, request, timeout)
        return ClassifyResult.from_pb(response, with_embedding=return_embedding)

    def embed(
        self,
        texts: str | Iterable[str],
        model: str | None = None,
        dimensions: int | None = None,
        no_truncation: bool = False,
        *,
        timeout: float | None = req.USE_CLIENT_TIMEOUT,
    ) -> EmbedResult:
        """Embeds one or many texts with a sentence-embedding model.

        Args:
            texts: The texts (a single string is one text).
            model: The embedder; None selects the only embedder the server hosts.
            dimensions: Keep only the first this many values of each vector (normalized again when the
                model's vectors are); None keeps all `ModelInfo.embedding_size`.
            no_truncation: Fail with INVALID_ARGUMENT on a text longer than the model's limit, instead of
                truncating it (and flagging it `truncated`).
            timeout: This call's deadline in seconds; left out, the client's default.

        Returns:
            One `Embedding` per text, in order (`result.vectors` gives the vectors alone).

        Raises:
            ServerError: INVALID_ARGUMENT (no text, an empty text, bad dimensions...), NOT_FOUND,
                RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED...
        """
        request = req.embed_request(texts, model, dimensions, no_truncation)
        return EmbedResult.from_pb(self._call(self._stub.Embed, request, timeout))

    def classify_tokens(
        self,
        texts: str | Iterable[str],
        model: str | None = None,
        aggregation: str = "simple",
        no_truncation: bool = False,
        *,
        timeout: float | None = req.USE_CLIENT_TIMEOUT,
    ) -> TokenClassifyResult:
        """Finds the entities of one or many texts with a token-classification (NER) model.

        Args:
            texts: The texts (a single string is one text).
            model: The token classifier; None selects the only one the server hosts.
            aggregation: How token labels become entities, as transformers' pipeline `aggregation_strategy`:
                "none" (every token, its own label), "simple" (the default), "first", "average" or "max".
            no_truncation: Fail with INVALID_ARGUMENT on a text longer than the model's limit.
            timeout: This call's deadline in seconds; left out, the client's default.

        Returns:
            One `TokenClassification` (its entities with character and byte offsets) per text, in order.

        Raises:
            ValueError: An unknown aggregation.
            ServerError: INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED...
        """
        request = req.classify_tokens_request(texts, model, aggregation, no_truncation)
        return TokenClassifyResult.from_pb(self._call(self._stub.ClassifyTokens, request, timeout))

    def generate(
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
        """Generates a continuation of a prompt and returns it whole.

        Args:
            prompt: The prompt (not empty).
            model: The generator; None selects the only generator the server hosts.
            max_new_tokens: Tokens to generate at most; None uses the model's default.
            temperature: 0 decodes greedily; above 0 samples with this temperature.
            top_k: Sample among the k most probable tokens only; 0 keeps all.
            top_p: Nucleus sampling, in (0, 1]; None is 1.
            repetition_penalty: Penalise tokens already seen (> 0); None is 1, no penalty.
            seed: The sampler's seed: the same seed and parameters give the same output. None is random.
            stop: Up to 8 stop sequences: generation ends before the first one, whose text is not returned.
            logprobs: Also return the log-probability of each generated token.
            timeout: This call's deadline in seconds; left out, the client's default.

        Returns:
            The generated text, its tokens, the finish reason, token counts and timings.

        Raises:
            ServerError: INVALID_ARGUMENT (naming the bad field), NOT_FOUND, RESOURCE_EXHAUSTED, ...
        """
        request = req.generate_request(
            prompt, model, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, logprobs
        )
        return Generation.from_pb(self._call(self._stub.Generate, request, timeout))

    def generate_stream(
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
    ) -> Iterator[GenerationChunk]:
        """Generates a continuation of a prompt, piece by piece, as the server decodes it.

        Takes the same arguments as `generate`. The last chunk carries the finish reason, the token counts and
        the timings; the texts of all chunks joined equal what `generate` returns. Leaving the loop early (or
        closing the iterator) cancels the call, and the server frees the sequence's slot.

        Yields:
            `GenerationChunk`s, in order.

        Raises:
            ServerError: As `generate`, raised from the iteration (possibly after some chunks).
        """
        request = req.generate_request(
            prompt, model, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop, logprobs
        )
        return self._stream(request, timeout)

    def chat(
        self,
        messages: Sequence[tuple[str, str] | Mapping[str, str]],
        model: str | None = None,
        *,
        timeout: float | None = req.USE_CLIENT_TIMEOUT,
        **params: Any,
    ) -> Generation:
        """Answers a conversation with the model's own chat template, and returns the answer whole.

        Args:
            messages: (role, content) pairs or {"role": ..., "content": ...} mappings, oldest first; roles as
                the model's template accepts them ("system", "user", "assistant").
            model: The generator; None selects the only generator the server hosts.
            timeout: This call's deadline in seconds; left out, the client's default.
            **params: The sampling arguments of `generate` (max_new_tokens, temperature, top_k, top_p,
                repetition_penalty, seed, stop, logprobs).

        Returns:
            The answer; it ends at any of the model's end-of-sequence tokens (finish reason EOS).

        Raises:
            ServerError: INVALID_ARGUMENT for a model without a chat template, and as `generate`.
        """
        request = req.chat_request(messages, model, **params)
        return Generation.from_pb(self._call(self._stub.Generate, request, timeout))

    def chat_stream(
        self,
        messages: Sequence[tuple[str, str] | Mapping[str, str]],
        model: str | None = None,
        *,
        timeout: float | None = req.USE_CLIENT_TIMEOUT,
        **params: Any,
    ) -> Iterator[GenerationChunk]:
        """Answers a conversation piece by piece: `chat`'s arguments, `generate_stream`'s chunks."""
        return self._stream(req.chat_request(messages, model, **params), timeout)

    def _stream(self, request: Any, timeout: float | None) -> Iterator[GenerationChunk]:
        call = self._stub.GenerateStream(request, timeout=self._timeout(timeout), metadata=self._metadata)
        try:
            for message in call:
                yield GenerationChunk.from_pb(message)
        except grpc.RpcError as e:
            raise ServerError.from_rpc_error(e) from e
        finally:
            # A no-op once the stream has ended; otherwise the consumer left early: stop the server's work.
            call.cancel()

    def list_models(self, *, timeout: float | None = req.USE_CLIENT_TIMEOUT) -> list[ModelInfo]:
        """Lists the models the server hosts.

        Raises:
            ServerError: UNAVAILABLE when the server cannot be reached, ...
        """
        response = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [ModelInfo.from_pb(m) for m in response.models]

    def get_model(self, name: str, *, timeout: float | None = req.USE_CLIENT_TIMEOUT) -> ModelInfo:
        """Describes one model.

        Raises:
            ServerError: NOT_FOUND when the server hosts no model of that name, ...
        """
        return ModelInfo.from_pb(self._call(self._stub.GetModel, pb.GetModelRequest(name=name), timeout))

    def health(self, service: str = "", *, timeout: float | None = req.USE_CLIENT_TIMEOUT) -> str:
        """Asks the standard gRPC health service for a status.

        Args:
            service: "" for the whole server, or a model's name for that model.
            timeout: This call's deadline in seconds; left out, the client's default.

        Returns:
            "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN".

        Raises:
            ServerError: NOT_FOUND for a service the server does not know, UNAVAILABLE when it cannot be
                reached, ...
        """
        response = self._call(self._health_check, req.HealthCheckRequest(service=service), timeout)
        return req.health_status_name(response)
