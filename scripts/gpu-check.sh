#!/usr/bin/env bash
# The GPU check: for a machine with an NVIDIA GPU, CUDA and PyTorch but no Rust toolchain. It runs
# from the repository root with binaries built elsewhere and writes one JSON file:
#   - parity: every backend's outputs on the parity fixtures (UNet, text encoder, VAE) against the
#     diffusers/transformers references, in f32, f16 and bf16 (relative max error);
#   - duo_step: one DUO training step of the SD 1.4 UNet at 512² (latents 64²) with 4 pairs, on each
#     backend and in PyTorch on the same device: time and peak device memory;
#   - unet: UNet forward and forward + backward times, and sampling throughput (images/s);
#   - each step's command, exit status and the end of its log, so a failure is readable.
#
# Build (elsewhere) and run:
#   cargo build --release -p duo-bench --features cuda,vulkan && strip target/release/duo-bench
#   scripts/gpu-check.sh --bin target/release --out gpu-check.json
#
# Peak device memory is the highest `nvidia-smi` reading of the GPU's used memory during the step,
# minus the reading before it, for every implementation alike (PyTorch's own
# max_memory_allocated is kept too).
#
# Dry run on any machine (CPU backend, PyTorch on the CPU, small shapes), to check the script:
#   scripts/gpu-check.sh --bin target/release --devices cpu --torch-device cpu --quick --out cpu-check.json
set -euo pipefail

BIN=target/release
DEVICES="cuda vulkan torch-cuda"
TORCH_DEVICE=cuda
PYTHON=python3
OUT=gpu-check.json
QUICK=0
STEP_LIMIT=240

usage() {
  sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
  echo "options: --bin DIR  --devices \"LIST\"  --torch-device DEV  --python PY  --out FILE  --quick  --step-limit SECONDS"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN=$2; shift 2 ;;
    --devices) DEVICES=$2; shift 2 ;;
    --torch-device) TORCH_DEVICE=$2; shift 2 ;;
    --python) PYTHON=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --step-limit) STEP_LIMIT=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu-check: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

BENCH="$BIN/duo-bench"
if [ ! -x "$BENCH" ]; then
  echo "gpu-check: no duo-bench binary at $BENCH (build it with cargo build --release -p duo-bench --features cuda,vulkan)" >&2
  exit 2
fi
if [ ! -d tests/fixtures/forward ] || [ ! -d models/sd-v1-4-configs ]; then
  echo "gpu-check: run it from the repository root (tests/fixtures/forward and models/sd-v1-4-configs)" >&2
  exit 2
fi

if [ "$QUICK" = 1 ]; then
  CONFIGS=tests/fixtures/models/sd1-tiny; LATENT=8; PAIRS=4; SAMPLE_STEPS=5; ITERS=2
else
  CONFIGS=models/sd-v1-4-configs; LATENT=64; PAIRS=4; SAMPLE_STEPS=25; ITERS=3
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STEPS="$WORK/steps.jsonl"
: > "$STEPS"
STARTED=$(date +%s)

log() { echo "[gpu-check $(( $(date +%s) - STARTED )) s] $*" >&2; }

gpu_memory_mib() {
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1 | tr -d ' '
}

# run NAME CMD…: one step, bounded by STEP_LIMIT seconds; its status, time, log tail and peak device
# memory go into steps.jsonl.
run() {
  local name=$1; shift
  local log_file="$WORK/$name.log" memory_file="$WORK/$name.memory" sampler="" before=""
  if command -v nvidia-smi > /dev/null; then
    before=$(gpu_memory_mib || true)
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$memory_file" 2>/dev/null &
    sampler=$!
  fi
  local start status
  start=$(date +%s%N)
  set +e
  timeout "$STEP_LIMIT" "$@" > "$log_file" 2>&1
  status=$?
  set -e
  local seconds=$(( ($(date +%s%N) - start) / 1000000 ))
  if [ -n "$sampler" ]; then kill "$sampler" 2> /dev/null || true; wait "$sampler" 2> /dev/null || true; fi
  "$PYTHON" - "$name" "$status" "$seconds" "$log_file" "$memory_file" "${before:-}" "$*" >> "$STEPS" <<'PY'
import json, sys
name, status, seconds, log_file, memory_file, before, command = sys.argv[1:8]
try:
    readings = [int(l) for l in open(memory_file) if l.strip().isdigit()]
except OSError:
    readings = []
peak = max(readings) - int(before) if readings and before.isdigit() else None
tail = open(log_file, errors="replace").read()[-1500:]
print(json.dumps({"step": name, "command": command, "status": int(status), "seconds": int(seconds) / 1000,
                  "peak_device_mib": peak, "log_tail": tail}))
PY
  if [ "$status" = 0 ]; then log "$name: ok"; else log "$name: exit $status (see its log_tail in $OUT)"; fi
}

# 1. Parity against the fixtures, every backend and float type
FIXTURES="unet-float:unet unet-int:unet text_encoder:text_encoder vae-square:vae"
for device in $DEVICES; do
  for dtype in f32 f16 bf16; do
    for entry in $FIXTURES; do
      fixture=${entry%%:*}; component=${entry##*:}
      base="tests/fixtures/forward/sd1-tiny-$fixture"
      run "parity.$device.$dtype.$fixture" "$BENCH" --device "$device" --dtype "$dtype" forward \
        --model tests/fixtures/models/sd1-tiny --component "$component" --inputs "$base.in.safetensors" \
        --out "$WORK/out.safetensors" --expected "$base.out.safetensors" \
        --errors-json "$WORK/parity.$device.$dtype.$fixture.json"
    done
  done
done

# 2. The DUO step and the UNet timings: each backend, then PyTorch on the same device
for device in $DEVICES; do
  run "duo_step.$device" "$BENCH" --device "$device" perf --duo-step --model "$CONFIGS" --batch "$PAIRS" \
    --latent-size "$LATENT" --iters "$ITERS" --json "$WORK/duo_step.$device.json"
  run "unet.$device" "$BENCH" --device "$device" perf --model "$CONFIGS" --batch 1 --latent-size "$LATENT" \
    --iters "$ITERS" --sample-steps "$SAMPLE_STEPS" --json "$WORK/unet.$device.json"
done
run "duo_step.pytorch" "$PYTHON" tests/perf/reference.py --model "$CONFIGS" --batch "$PAIRS" \
  --latent-size "$LATENT" --iters "$ITERS" --device "$TORCH_DEVICE" --duo-step --out "$WORK/duo_step.pytorch.json"
run "unet.pytorch" "$PYTHON" tests/perf/reference.py --model "$CONFIGS" --batch 1 --latent-size "$LATENT" \
  --iters "$ITERS" --sample-steps "$SAMPLE_STEPS" --device "$TORCH_DEVICE" --out "$WORK/unet.pytorch.json"

# 3. One JSON file
"$PYTHON" - "$WORK" "$OUT" "$DEVICES" "$TORCH_DEVICE" "$QUICK" "$CONFIGS" "$LATENT" "$PAIRS" <<'PY'
import json, os, subprocess, sys
work, out, devices, torch_device, quick, configs, latent, pairs = sys.argv[1:9]

def read(name):
    path = os.path.join(work, name)
    return json.load(open(path)) if os.path.exists(path) else None

def gpu():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None

steps = [json.loads(l) for l in open(os.path.join(work, "steps.jsonl"))]
by_name = {s["step"]: s for s in steps}
result = {"gpu": gpu(), "quick": quick == "1", "model_configs": configs, "latent_size": int(latent),
          "pairs": int(pairs), "torch_device": torch_device, "parity": {}, "duo_step": {}, "unet": {}, "steps": steps}
for name, step in by_name.items():
    kind, _, rest = name.partition(".")
    figures = read(name + ".json")
    if kind == "parity":
        device, dtype, fixture = rest.split(".")
        result["parity"].setdefault(device, {}).setdefault(dtype, {})[fixture] = figures if step["status"] == 0 else None
    else:
        entry = {"figures": figures, "status": step["status"], "seconds": step["seconds"],
                 "peak_device_mib": step["peak_device_mib"]}
        result[kind][rest] = entry
json.dump(result, open(out, "w"), indent=2)
for device, dtypes in result["parity"].items():
    for dtype, fixtures in dtypes.items():
        worst = max((e for errors in fixtures.values() if errors for e in errors.values()), default=None)
        print(f"parity {device} {dtype}: worst relative error {worst if worst is None else f'{worst:.2e}'}")
failed = [s["step"] for s in steps if s["status"] != 0]
print(f"wrote {out}: {len(steps)} steps, {len(failed)} failed" + (f" ({', '.join(failed)})" if failed else ""))
PY
