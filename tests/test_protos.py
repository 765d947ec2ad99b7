import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh():
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "codegen.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_stubs_import_without_the_server():
    # The light client needs only grpcio and protobuf.
    from client.proto import inference_pb2, inference_pb2_grpc

    assert inference_pb2.DESCRIPTOR.package == "nlpserve.v1"
    assert hasattr(inference_pb2_grpc, "InferenceServiceStub")


def test_open_inference_protocol_stubs_live_in_their_own_package():
    # Triton's package name and service, generated apart from client/proto so that no module name clashes
    # (client/proto's inference_pb2 is nlpserve.v1's).
    from server.servicers.oip import grpc_service_pb2, grpc_service_pb2_grpc

    assert grpc_service_pb2.DESCRIPTOR.package == "inference"
    assert grpc_service_pb2.DESCRIPTOR.name == "inference/grpc_service.proto"
    assert hasattr(grpc_service_pb2_grpc, "GRPCInferenceServiceStub")
    assert not list((ROOT / "client" / "proto").glob("grpc_service_pb2*"))
    assert not list((ROOT / "server" / "servicers" / "oip").glob("inference_pb2*"))
