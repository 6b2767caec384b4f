#!/usr/bin/env bash
# GPU checks for a CUDA build of `tune`, in one go, on a machine with no Rust and no internet
# (the binary and tests/fixtures travel with the working tree).
#
#   scripts/build-cuda.sh                                  # build machine: also writes dist/tune-cuda.gz
#   OUT=/tmp/gpu TUNE_BIN=dist/tune-cuda.gz scripts/gpu-check.sh   # GPU machine, from the repo root
#
# Checks: the GPU; lora_step, qlora_step and trajectory fixtures on CUDA in fp32 (CPU tolerances)
# and bf16 (loss within 1%), each printing "pass"; NF4 device dequantisation against the host's
# bits; a 7B-shaped LoRA training benchmark (random weights, 7B_lora_single_device's LoRA
# settings) with tokens/s, MFU and peak GPU memory: 2 x 2048 tokens with and without activation
# checkpointing, and 2 x 512 tokens with it (near the shape of torchtune's published 7B memory
# figure).
#
# What comes back from a device run is limited (a few files): every result goes into one archive,
# $OUT/gpu-check.tgz, a one-line-per-check summary into $OUT/summary.txt (as each check ends) and
# stdout, and the GPU and library facts into $OUT/gpu.txt. The step timeouts add up to 530 s
# (plus 5 s of kill grace each); give the run about 580 s.
set -uo pipefail

OUT="${OUT:-/tmp/tune-gpu-check}"
BIN="${TUNE_BIN:-target/release/tune}"
BENCH_BATCH="${BENCH_BATCH:-2}"
BENCH_SEQ="${BENCH_SEQ:-2048}"
# A rehearsal on a machine without a GPU: TUNE_DEVICE=cpu BENCH_MODEL= BENCH_SEQ=128 BENCH_SHORT_SEQ=64
# (every step runs on the CPU, bf16 too: candle widens bf16 matmuls to fp32 there).
DEVICE="${TUNE_DEVICE:-cuda}"
BENCH_DTYPE="${BENCH_DTYPE:-bf16}"
MODEL="${BENCH_MODEL-llama2_7b}"
MODEL_ARGS=()
[ -n "$MODEL" ] && MODEL_ARGS=(--model "$MODEL")
mkdir -p "$OUT"
: > "$OUT/summary.txt"
WORK="$(mktemp -d)"

# A gzipped binary (what fits the transfer limit) is unpacked first.
if [[ "$BIN" == *.gz ]]; then
  gunzip -c "$BIN" > "$WORK/tune" && chmod +x "$WORK/tune" && BIN="$WORK/tune"
fi

# The CUDA 13 user-space libraries (cuBLAS, cuRAND, ...) come with the machine's PyTorch wheels.
if [ -z "${TUNE_CUDA_LIB:-}" ]; then
  TUNE_CUDA_LIB="$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null || true)"
  if [ ! -e "$TUNE_CUDA_LIB/libcublas.so.13" ] && [ -e /usr/local/cuda/lib64/libcublas.so.13 ]; then
    TUNE_CUDA_LIB=/usr/local/cuda/lib64
  fi
  if [ ! -e "$TUNE_CUDA_LIB/libcublas.so.13" ]; then
    found="$(timeout 60 find / \( -path /proc -o -path /sys \) -prune -o -name libcublas.so.13 -print 2>/dev/null | head -1)"
    TUNE_CUDA_LIB="${found:+$(dirname "$found")}"
  fi
fi
add_lib_dir() { export LD_LIBRARY_PATH="$1${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; }
[ -n "$TUNE_CUDA_LIB" ] && add_lib_dir "$TUNE_CUDA_LIB"
# Libraries still missing (cuRAND or the runtime may live apart from cuBLAS): one search for all
# of them. Not libcuda: the driver's own is already on the loader's path, and a link stub found
# first would hide it.
missing="$(ldd "$BIN" 2>/dev/null | awk '/not found/ && $1 !~ /^libcuda\.so/ {print $1}')"
if [ -n "$missing" ]; then
  names=()
  for lib in $missing; do names+=(${names[@]+-o} -name "$lib"); done
  while read -r dir; do
    [ -n "$dir" ] && add_lib_dir "$dir"
  done < <(timeout 60 find / \( -path /proc -o -path /sys \) -prune -o \( "${names[@]}" \) -printf '%h\n' 2>/dev/null | sort -u)
fi
# candle's kernels ship as PTX that the driver compiles on first use: keep the compiled kernels
# between the steps' processes (a writable cache, large enough for all of them).
export CUDA_CACHE_PATH="${CUDA_CACHE_PATH:-$WORK/cuda-cache}" CUDA_CACHE_MAXSIZE="${CUDA_CACHE_MAXSIZE:-4294967296}"
echo "CUDA libraries: ${TUNE_CUDA_LIB:-not found (set TUNE_CUDA_LIB)}"

# Each summary line goes to $OUT at once: a run cut short still returns what it finished.
step() { # name timeout_seconds command...
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  timeout -k 5 "$limit" "$@" > "$WORK/$name.json" 2> "$WORK/$name.log"
  local rc=$?
  local verdict="rc=$rc"
  grep -q '"pass": true' "$WORK/$name.json" && verdict="pass"
  grep -q '"pass": false' "$WORK/$name.json" && verdict="FAIL"
  local line
  line="$(printf '%-40s %-6s %4ds' "$name" "$verdict" $((SECONDS - start)))"
  echo "$line" | tee -a "$WORK/summary.txt" "$OUT/summary.txt"
  if [ $rc -ne 0 ]; then
    tail -5 "$WORK/$name.log" | sed 's/^/    /'
  fi
  return 0
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv; "$BIN" --version;
  ldd "$BIN" | grep -E 'cuda|cublas|curand|not found'; } 2>&1 | tee "$WORK/gpu.txt" "$OUT/gpu.txt"

# The first step also pays the kernels' compilation (see CUDA_CACHE_PATH above).
step lora_step_cuda_fp32 90 "$BIN" selfcheck lora-step --device "$DEVICE" --dtype fp32
step lora_step_cuda_bf16 40 "$BIN" selfcheck lora-step --device "$DEVICE" --dtype bf16
step qlora_step_cuda_fp32 40 "$BIN" selfcheck qlora-step --device "$DEVICE" --dtype fp32
step qlora_step_cuda_bf16 40 "$BIN" selfcheck qlora-step --device "$DEVICE" --dtype bf16
step trajectory_cuda_fp32 40 "$BIN" selfcheck trajectory --device "$DEVICE" --dtype fp32
step trajectory_cuda_bf16 40 "$BIN" selfcheck trajectory --device "$DEVICE" --dtype bf16
step bench_7b_lora_bf16 90 "$BIN" bench ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"} --lora-attn-modules q_proj,v_proj,output_proj \
  --apply-lora-to-mlp --lora-rank 8 --lora-alpha 16 --batch-size "$BENCH_BATCH" --seq-len "$BENCH_SEQ" \
  --warmup 1 --steps 3 --device "$DEVICE" --dtype "$BENCH_DTYPE" --peak-tflops 989 --activation-checkpointing
# torchtune's 15.57 GiB (peak reserved) is 7B LoRA on Alpaca: batches of 2 sequences of a few
# hundred tokens (the longest padded batch sets it), with activation checkpointing. Near it:
# 2 x 512 tokens.
step bench_7b_lora_bf16_seq512 60 "$BIN" bench ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"} --lora-attn-modules q_proj,v_proj,output_proj \
  --apply-lora-to-mlp --lora-rank 8 --lora-alpha 16 --batch-size "$BENCH_BATCH" --seq-len "${BENCH_SHORT_SEQ:-512}" \
  --warmup 1 --steps 3 --device "$DEVICE" --dtype "$BENCH_DTYPE" --peak-tflops 989 --activation-checkpointing
step bench_7b_lora_bf16_no_checkpointing 90 "$BIN" bench ${MODEL_ARGS[@]+"${MODEL_ARGS[@]}"} --lora-attn-modules q_proj,v_proj,output_proj \
  --apply-lora-to-mlp --lora-rank 8 --lora-alpha 16 --batch-size "$BENCH_BATCH" --seq-len "$BENCH_SEQ" \
  --warmup 1 --steps 2 --device "$DEVICE" --dtype "$BENCH_DTYPE" --peak-tflops 989

# The benchmarks' headline numbers, for the summary. (A bench says rc=0 when it ran. Device
# memory: the pool's peaks in the timed steps, as torch's max_memory_allocated / _reserved, and
# the driver's total at the end, CUDA context and cuBLAS workspaces included.)
for b in bench_7b_lora_bf16 bench_7b_lora_bf16_seq512 bench_7b_lora_bf16_no_checkpointing; do
  grep -E '"(tokens_per_second|mfu|mfu_lora|peak_device_memory_gib|peak_device_reserved_gib|device_memory_used_gib)"' "$WORK/$b.json" 2>/dev/null \
    | tr -d ' ,' | sed "s/^/$b /" | tee -a "$WORK/summary.txt" "$OUT/summary.txt"
done

tar czf "$OUT/gpu-check.tgz" -C "$WORK" --exclude tune --exclude cuda-cache .
echo "results: $OUT/summary.txt and $OUT/gpu-check.tgz"
