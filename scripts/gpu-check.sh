#!/usr/bin/env bash
# GPU checks for a CUDA build of `tune`, in one go, on a machine with no Rust and no internet
# (the binary and tests/fixtures travel with the working tree). Writes JSON results under $OUT.
#
#   scripts/build-cuda.sh                      # on the build machine (no GPU needed)
#   OUT=/tmp/gpu scripts/gpu-check.sh          # on the GPU machine, from the repo root
#
# Checks: the GPU; lora_step, qlora_step and trajectory fixtures on CUDA in fp32 (CPU tolerances) and bf16
# (loss within 1%); a 7B-shaped LoRA training benchmark (random weights, 7B_lora_single_device's
# LoRA settings) with tokens/s, MFU and peak GPU memory.
set -uo pipefail

OUT="${OUT:-/tmp/tune-gpu-check}"
BIN="${TUNE_BIN:-target/release/tune}"
BENCH_BATCH="${BENCH_BATCH:-2}"
BENCH_SEQ="${BENCH_SEQ:-2048}"
mkdir -p "$OUT"

# The CUDA 13 user-space libraries (cuBLAS, cuRAND, ...) come with the machine's PyTorch wheels.
if [ -z "${TUNE_CUDA_LIB:-}" ]; then
  TUNE_CUDA_LIB="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)"
  if [ ! -e "$TUNE_CUDA_LIB/libcublas.so.13" ]; then
    TUNE_CUDA_LIB="$(dirname "$(find / -name 'libcublas.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)")"
  fi
fi
export LD_LIBRARY_PATH="$TUNE_CUDA_LIB:${LD_LIBRARY_PATH:-}"
echo "CUDA libraries: $TUNE_CUDA_LIB"

step() { # name timeout_seconds command...
  local name="$1" limit="$2"; shift 2
  echo "=== $name"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
  local rc=$?
  echo "rc=$rc seconds=$((SECONDS - start))"
  tail -c 1500 "$OUT/$name.json"; echo
  [ $rc -ne 0 ] && tail -20 "$OUT/$name.log"
  return 0
}

nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee "$OUT/gpu.csv"
"$BIN" --version | tee "$OUT/tune-version.txt"

step lora_step_cuda_fp32 45 "$BIN" selfcheck lora-step --device cuda --dtype fp32
step lora_step_cuda_bf16 45 "$BIN" selfcheck lora-step --device cuda --dtype bf16
step qlora_step_cuda_fp32 45 "$BIN" selfcheck qlora-step --device cuda --dtype fp32
step qlora_step_cuda_bf16 45 "$BIN" selfcheck qlora-step --device cuda --dtype bf16
step trajectory_cuda_fp32 60 "$BIN" selfcheck trajectory --device cuda --dtype fp32
step trajectory_cuda_bf16 60 "$BIN" selfcheck trajectory --device cuda --dtype bf16
step bench_7b_lora_bf16 150 "$BIN" bench --model llama2_7b --lora-attn-modules q_proj,v_proj,output_proj \
  --apply-lora-to-mlp --lora-rank 8 --lora-alpha 16 --batch-size "$BENCH_BATCH" --seq-len "$BENCH_SEQ" \
  --warmup 1 --steps 3 --device cuda --dtype bf16 --peak-tflops 989 --activation-checkpointing
step bench_7b_lora_bf16_no_checkpointing 150 "$BIN" bench --model llama2_7b --lora-attn-modules q_proj,v_proj,output_proj \
  --apply-lora-to-mlp --lora-rank 8 --lora-alpha 16 --batch-size "$BENCH_BATCH" --seq-len "$BENCH_SEQ" \
  --warmup 1 --steps 2 --device cuda --dtype bf16 --peak-tflops 989
echo "results in $OUT"
ls -la "$OUT"
