#!/usr/bin/env bash
# The GPU speed checks for a short loan of one GPU, in parts that each fit one command of a loan (at most 10
# minutes; sample + train take at most about 13 minutes together, so run them first):
#   sample   batch-1 sampling of the 300M, 1B and LVM-7B shapes against the memory-bandwidth bound,
#            transformers' generate with its static cache beside ours, a profile of ours (kernels vs wall)
#   train    the training step against transformers (both compiled) with a profile of ours, and the training
#            loop's MFU at 256 and 4096 tokens
#   explore  if time is left: the 300M sampling step with inductor's coordinate-descent tuning (its kernels'
#            launch configurations searched)
# Each check has its own time limit, so one slow compile cannot take the rest down; the logs go to $OUT
# (default gpu-logs/).
#
#     bash bench/gpu.sh sample
#     bash bench/gpu.sh train
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:-sample}
out=${OUT:-gpu-logs}
mkdir -p "$out"
check() {  # check NAME SECONDS COMMAND...: run, log, never stop the script
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "   exit $? after ${SECONDS}s in all; tail of $out/$name.log:"
  grep -v -i "warn" "$out/$name.log" | tail -n 12 | sed 's/^/   /'
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
case $part in
  sample)
    # perf_hints: torch.compile says here if it could not record CUDA graphs (and why)
    export TORCH_LOGS=perf_hints,recompiles
    check sample-300M 150 python bench/sample.py --device cuda --size 300M --batch 1 --compile --profile
    check sample-1B 100 python bench/sample.py --device cuda --size 1B --batch 1 --compile --skip_hf --repeats 3
    check sample-7B 120 python bench/sample.py --device cuda --size lvm-7b --batch 1 --compile --skip_hf --repeats 3
    ;;
  train)
    check step-300M 150 python bench/step.py --device cuda --size 300M --batch_size 8 --seq_len 1024 \
      --dtype bfloat16 --compile --profile
    check train-300M 180 python bench/train.py --size=300M --steps=20 --warmup=8
    ;;
  explore)
    export TORCH_LOGS=perf_hints,recompiles
    check sample-300M-tuned 240 python bench/sample.py --device cuda --size 300M --batch 1 --compile --skip_hf \
      --repeats 3 --inductor coordinate_descent_tuning=True
    ;;
  *) echo "usage: bash bench/gpu.sh sample|train|explore"; exit 2 ;;
esac
