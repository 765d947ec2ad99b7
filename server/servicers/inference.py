"""The nlpserve.v1 InferenceService: thin handlers that turn protos into domain objects, call the core
(`ModelHub`), and turn the results back into protos. Errors are mapped in `status.py`, not here."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from client.proto import inference_pb2 as pb

from ..metrics import Metrics
from ..models import ModelHub
from ..repository import CLASSIFIER, EMBEDDER, GENERATOR, TOKEN_CLASSIFIER
from ..types import ClassifyRequest, EmbedRequest, GenerateRequest, TokenClassifyRequest
from .status import Call, Gate, stream, unary


class InferenceServicer:
    def __init__(self, hub: ModelHub, metrics: Metrics, gate: Gate, unread_timeout: float) -> None:
        self.hub = hub
        self.metrics = metrics
        self.gate = gate
        self.unread_timeout = unread_timeout  # seconds a stream's client may read nothing

    @unary("Classify", pb.ClassifyRequest)
    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext, call: Call
    ) -> pb.ClassifyResponse:
        served = self.hub.pick(request.model, CLASSIFIER)
        call.model = served.name
        result = await self.hub.classify(served, ClassifyRequest.from_pb(request), call.deadline)
        return result.to_pb()

    @unary("Embed", pb.EmbedRequest)
    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext, call: Call) -> pb.EmbedResponse:
        served = self.hub.pick(request.model, EMBEDDER)
        call.model = served.name
        result = await self.hub.embed(served, EmbedRequest.from_pb(request), call.deadline)
        return result.to_pb()

    @unary("ClassifyTokens", pb.ClassifyTokensRequest)
    async def ClassifyTokens(
        self, request: pb.ClassifyTokensRequest, context: grpc.aio.ServicerContext, call: Call
    ) -> pb.ClassifyTokensResponse:
        served = self.hub.pick(request.model, TOKEN_CLASSIFIER)
        call.model = served.name
        result = await self.hub.classify_tokens(served, TokenClassifyRequest.from_pb(request), call.deadline)
        return result.to_pb()

    @unary("Generate", pb.GenerateRequest)
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, call: Call
    ) -> pb.GenerateResponse:
        served = self.hub.pick(request.model, GENERATOR)
        call.model = served.name
        chunk = await self.hub.generate(served, GenerateRequest.from_pb(request), call.deadline)
        return chunk.to_pb(served.name, served.description.version)

    @stream("GenerateStream", pb.GenerateRequest)
    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, call: Call
    ) -> AsyncIterator[pb.GenerateResponse]:
        served = self.hub.pick(request.model, GENERATOR)
        call.model = served.name
        version = served.description.version
        chunks = self.hub.generate_stream(served, GenerateRequest.from_pb(request), call.deadline)
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                yield chunk.to_pb(served.name, version)

    @unary("ListModels", pb.ListModelsRequest)
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext, call: Call
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[m.description.to_pb(m.ready) for m in self.hub.models.values()])

    @unary("GetModel", pb.GetModelRequest)
    async def GetModel(
        self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext, call: Call
    ) -> pb.ModelInfo:
        served = self.hub.get(request.name)
        call.model = served.name
        return served.description.to_pb(served.ready)
