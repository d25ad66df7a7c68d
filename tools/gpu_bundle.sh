#!/usr/bin/env bash
# Builds, on any x86-64 Linux machine with Rust (no GPU, no CUDA toolkit needed: cudarc loads the
# driver and NVRTC at run time), everything `tools/gpu_check.sh` runs on a GPU machine, and packs it
# into `gpu-bundle/` (stripped binaries, xz-compressed, ~40 MB; ignored by git: carry it).
#
#   tools/gpu_bundle.sh            # then copy gpu-bundle/ beside a checkout on the GPU machine
#
# What it builds, all with the `cuda` feature, in the release profile:
#   - `prefer` (the CLI)                      cargo build --release -p prefer-cli --features cuda
#   - the selective log-softmax bench         cargo bench --no-run --bench selective_log_softmax --features cuda
#   - prefer-kernels' test binaries           cargo test --release --no-run -p prefer-kernels --features cuda,ndarray
# The binaries need glibc ≥ the build machine's; CARGO_TARGET_DIR is honoured.
# GPU_BUNDLE_MODEL=DIR also packs a Hugging Face model directory holding `pairs.jsonl` (e.g. the
# random Llama of ../shared/bench/side_by_side_cpu.py, 20 MB) for gpu_check's timed step.
set -euo pipefail
cd "$(dirname "$0")/.."
out=gpu-bundle
rm -rf "$out" && mkdir -p "$out/bin/tests" "$out/bin/bench"

executables() { grep -o '"executable":"[^"]*"' | cut -d'"' -f4; }
# Test and bench binaries are named `<name>-<hash>`: keep the name.
pack() { while read -r exe; do strip -o "$1/$(basename "$exe" | sed 's/-[0-9a-f]\{16\}$//')" "$exe"; done; }

cargo build --release -p prefer-cli --features cuda --message-format=json-render-diagnostics \
    | executables | grep '/prefer$' | pack "$out/bin"
cargo bench --no-run --bench selective_log_softmax --features cuda \
    --message-format=json-render-diagnostics | executables | pack "$out/bin/bench"
cargo test --release --no-run -p prefer-kernels --features cuda,ndarray \
    --message-format=json-render-diagnostics | executables | pack "$out/bin/tests"
if [ -n "${GPU_BUNDLE_MODEL:-}" ]; then cp -r "$GPU_BUNDLE_MODEL" "$out/model"; fi
{ git rev-parse HEAD; git status --short; } > "$out/commit"
tar -C "$out" -cf - bin | xz -T0 -6 > "$out/bins.tar.xz"
rm -rf "$out/bin"
ls -l "$out"
