#!/usr/bin/env bash
# How the cost of one DUO step grows: time and peak memory of the SD 1.4-shaped step (random
# weights, LoRA rank 32 on self-attention, as the learner trains it) for each latent size and pair
# count, ours beside PyTorch + diffusers + peft in the same `duo-bench perf --duo-step --compare`
# run. Writes one JSON file per point under --out and prints a markdown table.
#
#   cargo build --release -p duo-bench
#   scripts/duo-step-growth.sh --python PY [--device cpu] [--sizes "8 16 32"] [--pairs "1 2 4"] \
#       [--iters 1] [--out runs/duo-step-growth] [--checkpointing]
#
# PY is a Python interpreter with torch, diffusers and peft (docs/reference-stack.md). Each point
# runs one warm-up step and --iters timed ones on both sides; on a 2-core CPU, latents 32² with 4
# pairs take about ten minutes. --checkpointing times both sides with gradient checkpointing (for
# points whose activations do not fit in memory otherwise); those files end in -checkpointed.json.
set -euo pipefail

BIN=target/release/duo-bench
DEVICE=cpu
PYTHON=python3
SIZES="8 16 32"
PAIRS="1 2 4"
ITERS=1
OUT=runs/duo-step-growth
MODEL=models/sd-v1-4-configs
CHECKPOINTING=()
SUFFIX=""

while [ $# -gt 0 ]; do
  case "$1" in
    --bin) BIN=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --python) PYTHON=$2; shift 2 ;;
    --sizes) SIZES=$2; shift 2 ;;
    --pairs) PAIRS=$2; shift 2 ;;
    --iters) ITERS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --checkpointing) CHECKPOINTING=(--gradient-checkpointing); SUFFIX=-checkpointed; shift ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "duo-step-growth: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ ! -x "$BIN" ]; then
  echo "duo-step-growth: no duo-bench binary at $BIN (cargo build --release -p duo-bench)" >&2
  exit 2
fi
mkdir -p "$OUT"

for size in $SIZES; do
  for pairs in $PAIRS; do
    json="$OUT/latents-$size-pairs-$pairs$SUFFIX.json"
    if [ -s "$json" ]; then
      echo "latents $size², $pairs pairs: $json exists, kept"
      continue
    fi
    echo "latents $size², $pairs pairs"
    "$BIN" --device "$DEVICE" perf --model "$MODEL" --duo-step --batch "$pairs" --latent-size "$size" \
      --iters "$ITERS" "${CHECKPOINTING[@]}" --compare --python "$PYTHON" --json "$json.partial"
    mv "$json.partial" "$json"
  done
done

# The table, from the JSON files (ours first, PyTorch second in each).
"$PYTHON" - "$OUT" "$SUFFIX" $SIZES -- $PAIRS <<'EOF'
import json, sys
out, suffix = sys.argv[1], sys.argv[2]
split = sys.argv.index("--")
sizes, pairs = sys.argv[3:split], sys.argv[split + 1:]
note = " (checkpointed)" if suffix else ""
print("| latents | pairs | ours | PyTorch | ours / PyTorch | peak memory, ours | peak memory, PyTorch |")
print("|---|---|---|---|---|---|---|")
for size in sizes:
    for p in pairs:
        ours, torch = json.load(open(f"{out}/latents-{size}-pairs-{p}{suffix}.json"))
        t, r = ours["duo_step_ms"], torch["duo_step_ms"]
        mem = lambda x: f"{x['peak_rss_mib']:.0f} MiB" if x.get("peak_rss_mib") else "–"
        print(f"| {size}² | {p}{note} | {t / 1000:.2f} s | {r / 1000:.2f} s | {t / r:.2f}× | {mem(ours)} | {mem(torch)} |")
EOF
