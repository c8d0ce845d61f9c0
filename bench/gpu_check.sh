#!/usr/bin/env bash
# Every GPU benchmark of the project in one prepared run (< 8 minutes on one H100/H200), one table at the end.
#
#   bash bench/gpu_check.sh              # on a CUDA machine (InternVL3-1B/-8B shapes, random weights)
#   bash bench/gpu_check.sh --cpu-smoke  # the same scripts at tiny sizes on CPU: checks the plumbing and the table
#
# Each benchmark runs under its own time limit (they add up to 7.5 minutes), writes its full output to
# $LOGS/<name>.log, and contributes its ratio line to the table. A benchmark that fails or runs out of
# time shows as such in the table; the others still run. bench/engines.py needs vLLM (pip install
# 'facellm[vllm]'); without it that row says so. QLoRA needs bitsandbytes (pip install 'facellm[quant]').
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOGS=${LOGS:-$(mktemp -d /tmp/facellm-gpu-check.XXXXXX)}
MODE=gpu
[[ "${1:-}" == "--cpu-smoke" ]] && MODE=cpu
export TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ $MODE == gpu ]]; then
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to torch; use --cpu-smoke for the CPU plumbing check" >&2
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  # name | time limit (s) | command | pattern of the line(s) that carry the result
  BENCHES=(
    "eval-likelihood-1b|75|bench/eval_throughput.py --real-shapes --device cuda --dtype bfloat16 --questions 512 --batch-size 64 --ref-questions 64|speed-up"
    "serve-batching-1b|90|bench/serve_load.py --internvl3-1b-shapes --device cuda --clients 32 --requests 256 --max-tokens 32|ratio"
    "finetune-lora-1b|60|bench/finetune_step.py --shape internvl3-1b --batch 10 --seq 600 --steps 10|ratio"
    "finetune-qlora-8b|80|bench/finetune_step.py --shape internvl3-8b --method qlora --batch 2 --seq 600 --grad-ckpt --steps 5|ratio"
    "engines-1b|145|bench/engines.py --shape internvl3-1b --questions 512 --batch-size 64 --new-tokens 32|q/s|tok/s|first token|memory"
  )
else
  BENCHES=(
    "eval-likelihood-tiny|300|bench/eval_throughput.py --questions 16 --batch-size 8 --ref-questions 8|speed-up"
    "serve-batching-tiny|300|bench/serve_load.py --clients 4 --requests 16 --max-tokens 8 --torch-threads 1|ratio"
    "finetune-lora-tiny|300|bench/finetune_step.py --steps 3 --warmup 1|ratio"
    "engines-tiny|600|bench/engines.py --questions 16 --batch-size 8 --new-tokens 8|q/s|tok/s|first token|memory"
  )
fi

declare -a ROWS
total_start=$(date +%s)
for spec in "${BENCHES[@]}"; do
  IFS='|' read -r name limit cmd pattern <<<"$spec"
  pattern=${spec#*|*|*|}  # everything after the command: one or more |-separated patterns
  script=${cmd%% *}
  log="$LOGS/$name.log"
  if [[ $script == bench/engines.py ]] && ! $PY -c "import vllm" 2>/dev/null; then
    ROWS+=("$name|-|skipped|vllm not installed (pip install 'facellm[vllm]')")
    continue
  fi
  start=$(date +%s)
  # shellcheck disable=SC2086 - the command is a prepared word list
  timeout "$limit" $PY $cmd >"$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  if [[ $rc == 124 ]]; then
    status="timeout"
  elif [[ $rc != 0 ]]; then
    status="failed ($rc)"
  else
    status="ok"
  fi
  result=$(grep -E "$pattern" "$log" | tr -s ' ' | paste -sd ';' - | cut -c1-300)
  [[ -z $result ]] && result="(no result line; see $log)"
  ROWS+=("$name|${secs}s|$status|$result")
done

echo
echo "facellm $MODE check: $(( $(date +%s) - total_start )) s in all; full outputs in $LOGS"
printf '%-22s %-7s %-12s %s\n' "benchmark" "time" "status" "result"
for row in "${ROWS[@]}"; do
  IFS='|' read -r name secs status result <<<"$row"
  printf '%-22s %-7s %-12s %s\n' "$name" "$secs" "$status" "$result"
done
