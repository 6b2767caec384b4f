#!/usr/bin/env bash
# Builds target/release/tune with `--features cuda` on a machine without a GPU (see docs/cuda.md).
#
# Idempotent: the CUDA 13.0 toolchain (nvcc, headers, cuBLAS, cuRAND, ...) comes from NVIDIA's PyPI
# wheels into .cuda-toolchain/ (git-ignored); the unversioned .so links and a libcuda link stub that
# the wheels lack are made once. At run time the GPU machine's real driver libcuda.so.1 is used.
#
#   scripts/build-cuda.sh            # toolchain + release build for compute capability 9.0 (H100/H200),
#                                    # plus dist/tune-cuda.gz for scripts/gpu-check.sh
#   scripts/build-cuda.sh --toolchain-only
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.cuda-toolchain"
COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import nvidia" 2>/dev/null || [ ! -x "$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13 2>/dev/null)/bin/nvcc" ]; then
  # nvcc must be 13.0.x: a newer one writes PTX that the 13.0 driver (580) refuses.
  "$VENV/bin/pip" install --quiet \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
fi
# Physical path: RUSTFLAGS carries it, and cargo rebuilds everything when RUSTFLAGS change.
CU="$(cd "$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13)" && pwd -P)"

# Unversioned names the linker looks for.
for lib in cublas cublasLt cudart nvrtc; do
  [ -e "$CU/lib/lib$lib.so" ] || ln -s "lib$lib.so.13" "$CU/lib/lib$lib.so"
done
[ -e "$CU/lib/libcurand.so" ] || ln -s libcurand.so.10 "$CU/lib/libcurand.so"

# A link-time stub for libcuda (the driver library is only on the GPU machine).
if [ ! -e "$CU/lib/stubs/libcuda.so" ] || ! grep -q cuMemcpyDtoHAsync_v2 "$CU/lib/stubs/libcuda_stub.c"; then
  mkdir -p "$CU/lib/stubs"
  # Every cuXxx identifier in cuda.h: declared names and the `_v2`-style names their #defines map
  # them to (extra symbols are harmless in a link stub).
  grep -ohE '\bcu[A-Z][A-Za-z0-9_]*' "$CU/include/cuda.h" | sort -u \
    | sed 's/.*/void &(void) {}/' > "$CU/lib/stubs/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CU/lib/stubs/libcuda.so" "$CU/lib/stubs/libcuda_stub.c"
  ln -sf libcuda.so "$CU/lib/stubs/libcuda.so.1"
fi

[ "${1:-}" = "--toolchain-only" ] && { echo "CUDA toolchain ready in $CU"; exit 0; }

export CUDA_ROOT="$CU" CUDA_HOME="$CU" CUDA_PATH="$CU" NVCC="$CU/bin/nvcc"
export PATH="$CU/bin:$PATH" CUDA_COMPUTE_CAP="$COMPUTE_CAP" CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
export CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH="$CU/lib:$CU/lib/stubs:${LIBRARY_PATH:-}"
export RUSTFLAGS="${RUSTFLAGS:-} -L $CU/lib -L $CU/lib/stubs"
cd "$ROOT"
cargo build --release --features cuda -p "${CUDA_BUILD_PACKAGE:-tune-cli}"
ls -la target/release/tune
# What travels to the GPU machine: stripped and gzipped, it fits the transfer limit (the plain
# binary alone is ~63 MiB of the 64 MiB a device run may carry).
mkdir -p dist
strip -o dist/tune-cuda target/release/tune
gzip -9f dist/tune-cuda
ls -la dist/tune-cuda.gz
