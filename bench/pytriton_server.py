"""A classifier behind PyTriton (NVIDIA's Triton Inference Server with a Python model): what a user who picked
Triton would run for the same model. Run by `python -m bench triton` in a venv of its own
(.cache/pytriton-venv: nvidia-pytriton, onnxruntime, tokenizers; see bench/triton.py), never imported by the
project.

The model function is the bench's in-process loop (bench/inprocess.py `Classifier`: tokenize, pad to the
longest text of the batch, run the same ONNX file with the server's session settings, softmax), behind Triton's
dynamic batcher; input `text` BYTES [1] per request, outputs `label` BYTES [1] and `probabilities` FP32
[classes], the names the project's Open Inference Protocol front uses, so one perf_analyzer command line serves
both sides.

    python bench/pytriton_server.py --repository models --model sentiment --grpc-port 8001 ...

Prints one line `READY <grpc port>` when Triton serves the model, then blocks until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench.inprocess: numpy, onnxruntime, tokenizers only

from bench.inprocess import Classifier, ModelFiles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", default="fp32")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=0,
                        help="the dynamic batcher's max_queue_delay_microseconds (Triton's default: 0)")
    parser.add_argument("--workspace", type=Path, help="PyTriton's workspace (default: a temporary folder)")
    args = parser.parse_args()

    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    model = ModelFiles.find(args.repository, args.model)
    classifier = Classifier(model, args.variant, args.threads)
    labels = np.array([str(label).encode() for label in model.config["labels"]], dtype=np.object_)

    @batch
    def infer(text: np.ndarray) -> dict[str, np.ndarray]:
        probabilities = classifier([t.decode("utf-8") for t in text.reshape(-1)]).astype(np.float32)
        return {"label": labels[probabilities.argmax(axis=1)].reshape(-1, 1), "probabilities": probabilities}

    loopback = "127.0.0.1"  # nothing listens beyond this machine
    config = TritonConfig(grpc_address=loopback, grpc_port=args.grpc_port, http_address=loopback,
                          http_port=args.http_port, metrics_address=loopback, metrics_port=args.metrics_port,
                          log_verbose=0)
    # No token on any endpoint: perf_analyzer reads the model's statistics, which PyTriton restricts by default.
    security = TritonSecurityConfig(restricted_endpoints=[])
    with Triton(config=config, workspace=args.workspace, security_config=security) as triton:
        triton.bind(
            model_name=args.model,
            infer_func=infer,
            inputs=[Tensor(name="text", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="label", dtype=bytes, shape=(1,)),
                     Tensor(name="probabilities", dtype=np.float32, shape=(len(labels),))],
            config=ModelConfig(max_batch_size=args.max_batch_size,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us)),
            strict=True,
        )
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        triton.run()  # starts Triton and loads the model; returns when it serves
        print(f"READY {args.grpc_port}", flush=True)
        while not stop.wait(1.0) and triton.is_alive():
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
