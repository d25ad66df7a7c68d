#!/usr/bin/env bash
# The GPU check, in one go, on a machine with an NVIDIA GPU and the bundle `tools/gpu_bundle.sh`
# built elsewhere (no Rust, no network needed here):
#   1. the CUDA kernel tests: every fused kernel in f32, f16 and bf16, through Burn's fusion backend
#      and the raw CubeCL backend, against the CPU; the plane-reduction and shared-memory paths of
#      the selective log-softmax against each other;
#   2. the selective log-softmax bench on the device: forward + backward times against the naive
#      path, and the forward's bandwidth as a fraction of a copy's (the target: ≥ 80 %);
#   3. a short `prefer train` (the built-in job: NF4 base, LoRA, DPO) on CUDA and on the CPU,
#      in f32 and in bf16 with activation checkpointing,
#      with their logged losses side by side;
#   4. when the bundle holds a model (GPU_BUNDLE_MODEL), the side-by-side bench's step (f32 base,
#      LoRA r 8 on all linear layers, 4 pairs a step) timed on CUDA and on the CPU.
# Everything goes to one results file (Markdown) and to stdout.
#
#   tools/gpu_check.sh [BUNDLE_DIR (gpu-bundle)] [RESULTS_FILE (gpu-check.md, or $OUT/gpu-check.md)]
#
# CUDA is found at run time: the driver on the loader path, NVRTC and the CUDA headers from the
# toolkit (CUDA_PATH, else /usr/local/cuda, else the directory above `nvcc`).
set -uo pipefail
bundle=$(realpath "${1:-gpu-bundle}")
results=${2:-${OUT:+$OUT/}gpu-check.md}
steps=${GPU_CHECK_TRAIN_STEPS:-6}
work=$(mktemp -d)
exec > >(tee "$results") 2>&1
failed=()
run() { # run NAME COMMAND...: time it, record a failure
    local name=$1 t0=$SECONDS
    shift
    echo '```'
    timeout "${GPU_CHECK_STEP_TIMEOUT:-300}" "$@"
    local rc=$?
    echo '```'
    echo "*$name: exit $rc, $((SECONDS - t0)) s*"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

echo "# prefer GPU check — $(date -u +%Y-%m-%dT%H:%MZ)"
echo
echo "bundle built from: $(head -1 "$bundle/commit") $(tail -n +2 "$bundle/commit" | wc -l) files changed"
echo '```'
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
echo '```'

if [ -z "${CUDA_PATH:-}" ] && [ ! -d /usr/local/cuda ] && command -v nvcc >/dev/null; then
    CUDA_PATH=$(dirname "$(dirname "$(command -v nvcc)")")
    export CUDA_PATH
fi
if ! ldconfig -p | grep -q 'libnvrtc\.so'; then
    nvrtc=$(find -L "${CUDA_PATH:-/usr/local/cuda}" /usr/lib /opt -name 'libnvrtc.so*' 2>/dev/null | head -1)
    [ -n "$nvrtc" ] && export LD_LIBRARY_PATH="$(dirname "$nvrtc"):${LD_LIBRARY_PATH:-}"
fi
echo "CUDA_PATH=${CUDA_PATH:-/usr/local/cuda} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
tar -xJf "$bundle/bins.tar.xz" -C "$work" || exit 1
bin=$work/bin

compare() { # compare CUDA_RUN_DIR CPU_RUN_DIR: the logged losses side by side
    echo '```'
    python3 - "$1/metrics.jsonl" "$2/metrics.jsonl" <<'EOF'
import json, sys
def rows(path):
    try:
        return [r for r in map(json.loads, open(path)) if "loss" in r]
    except OSError as e:
        return print(e) or []
cuda, cpu = rows(sys.argv[1]), rows(sys.argv[2])
keys = ["loss", "grad_norm", "rewards/margins", "tokens_per_second"]
print("step | " + " | ".join(f"{k} cuda / cpu" for k in keys))
for a, b in zip(cuda, cpu):
    print(f"{a['step']:>4} | " + " | ".join(f"{a[k]:.6g} / {b[k]:.6g}" for k in keys))
if cuda and cpu:
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(cuda, cpu))
    print(f"largest |loss cuda - loss cpu| over {min(len(cuda), len(cpu))} steps: {worst:.3g}")
EOF
    echo '```'
}

echo
echo "## 1. CUDA kernel tests (f32, f16, bf16)"
# The binaries run side by side (NVRTC compiles each kernel on the CPU first), then report in turn.
pids=()
for t in "$bin"/tests/*; do
    run "tests $(basename "$t")" "$t" cuda --nocapture > "$work/$(basename "$t").log" 2>&1 &
    pids+=($!)
done
wait "${pids[@]}"
for t in "$bin"/tests/*; do
    cat "$work/$(basename "$t").log"
    grep -q ': exit 0,' "$work/$(basename "$t").log" || failed+=("tests $(basename "$t")")
done

echo
echo "## 2. Selective log-softmax on the device"
run "bench selective_log_softmax" "$bin"/bench/selective_log_softmax --device-only

# `watched NAME DIR COMMAND...`: `run` in DIR, with CubeCL's kernel compilations and autotune
# results logged there (its cubecl.toml), and the machine's load sampled every 15 s: a first CUDA
# step that takes minutes shows whether it is compiling, tuning or waiting.
watched() {
    local name=$1 dir=$2 t0=$SECONDS
    shift 2
    mkdir -p "$dir"
    printf '[compilation.logger]\nlevel = "basic"\nfile = "%s/compile.log"\n[autotune.logger]\nlevel = "minimal"\nfile = "%s/autotune.log"\n' \
        "$dir" "$dir" > "$dir/cubecl.toml"
    (cd "$dir" && run "$name" "$@") > "$dir/out.log" 2>&1 &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 15
        echo "$((SECONDS - t0)) s: compile log $(cat "$dir/compile.log" 2>/dev/null | wc -l) lines," \
            "autotune log $(cat "$dir/autotune.log" 2>/dev/null | wc -l) lines, load $(cut -d' ' -f1 /proc/loadavg)," \
            "GPU $(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>&1)"
    done > "$dir/load.log"
    wait "$pid"
    cat "$dir/out.log"
    echo '```'
    cat "$dir/load.log"
    echo "last compilations:"
    tail -n 5 "$dir/compile.log" 2>/dev/null | cut -c1-300
    echo '```'
    grep -q ": exit 0," "$dir/out.log" || failed+=("$name")
}

# `train BACKEND DIR ARGS...`: `prefer train`, watched on CUDA.
train() {
    local backend=$1 dir=$2
    shift 2
    local cmd=("$bin"/prefer train --backend "$backend" --output "$dir" --max_steps "$steps" \
        --logging_steps 1 --eval_steps 100000 --save_steps 100000 "$@")
    if [ "$backend" = cuda ]; then
        watched "train $(basename "$dir")" "$dir.watch" "${cmd[@]}"
    else
        run "train $(basename "$dir")" "${cmd[@]}"
    fi
}

echo
echo "## 3. \`prefer train\`, built-in job (NF4), $steps steps: CUDA beside the CPU"
for backend in cuda flex; do
    train "$backend" "$work/builtin-$backend" --eval_on_start false
done
compare "$work/builtin-cuda" "$work/builtin-flex"

echo
echo "## 3b. The same in bf16 with activation checkpointing: CUDA beside the CPU"
for backend in cuda flex; do
    train "$backend" "$work/builtin-bf16-$backend" --eval_on_start false --bf16 \
        --gradient_checkpointing
done
compare "$work/builtin-bf16-cuda" "$work/builtin-bf16-flex"

if [ -d "$bundle/model" ]; then
    echo
    echo "## 4. The side-by-side bench's step (f32 base), $steps steps: CUDA beside the CPU"
    for backend in cuda flex; do
        train "$backend" "$work/sbs-$backend" --model "$bundle/model" \
            --data "$bundle/model/pairs.jsonl" --eval_ratio 0 --per_device_train_batch_size 4 \
            --learning_rate 1e-4 --lr_scheduler_type constant --beta 0.1 --r 8 --lora_alpha 16 \
            --lora_dropout 0 --target_modules all-linear --load_in_4bit false --seed 0
    done
    compare "$work/sbs-cuda" "$work/sbs-flex"
fi

echo
if [ ${#failed[@]} -eq 0 ]; then
    echo "**All passed.**"
else
    echo "**Failed:** ${failed[*]}"
fi
[ ${#failed[@]} -eq 0 ]
