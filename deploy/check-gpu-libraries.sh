#!/bin/sh
# Fails (exit 1, naming them) when a library ONNX Runtime's CUDA provider needs is missing: those its provider
# libraries link (ldd), and cuDNN 9, which the CUDA provider loads at run time (dlopen, so ldd does not show
# it). libcuda.so.1 is the driver's, mounted by the NVIDIA Container Toolkit when a container starts: it is
# not looked for. The image runs this at build time (Dockerfile), so a broken base image fails the build and
# not the first start on a GPU host. TensorRT's provider is not checked: the image does not claim it.
#
# usage: check-gpu-libraries.sh CAPI_FOLDER   (onnxruntime's package folder `capi`)
set -eu
capi="$1"
status=0
for provider in shared cuda; do
    lib="$capi/libonnxruntime_providers_$provider.so"
    if [ ! -f "$lib" ]; then
        echo "missing: $lib (is onnxruntime-gpu installed?)" >&2
        status=1
        continue
    fi
    missing="$(ldd "$lib" | awk '/not found/ && $1 != "libcuda.so.1" { printf "%s ", $1 }')"
    if [ -n "$missing" ]; then
        echo "libraries missing for $(basename "$lib"): $missing" >&2
        status=1
    fi
done
if ! ldconfig -p | grep -q 'libcudnn\.so\.9'; then
    echo "libraries missing for the CUDA provider at run time: cuDNN 9 (libcudnn.so.9)" >&2
    status=1
fi
exit "$status"
