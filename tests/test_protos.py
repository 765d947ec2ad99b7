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
