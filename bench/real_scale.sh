#!/usr/bin/env bash
# The real-size path end to end, on whatever machine runs it (a CPU included): real photos -> the full-size f16-8192
# tokenizer -> `pretrain.py --size=300M` -> --resume, equal step for step -> `finetune.py` from it -> `sample.py`
# answers a prompt pair -> `evaluate.py segmentation` on the photos' held-out split. Every command is the one the
# README prints, with budgets of a few steps. Each stage's wall time and peak memory (RSS, /usr/bin/time) and the
# checkpoint sizes end up in $OUT/report.md.
#
#     bash bench/real_scale.sh                 # scikit-image's sample photos, a random-weight f16-8192 tokenizer
#     VQGAN=vq PHOTOS=~/pictures bash bench/real_scale.sh    # LVM's released tokenizer, your photos
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/real-scale}
D=$OUT/photos T=$OUT/tokens
PY=${PYTHON:-python}
mkdir -p "$OUT"
report=$OUT/report.md
echo "| stage | wall (s) | peak RSS (GB) |" > "$report"
echo "|---|---|---|" >> "$report"

stage() {  # stage NAME COMMAND...: run it as printed, log it, add its time and peak memory to the report
  local name=$1
  shift
  echo "== $name: $*"
  /usr/bin/time -f "%e %M" -o "$OUT/$name.time" "$@" > "$OUT/$name.log" 2>&1 || {
    echo "FAILED: $name (tail of $OUT/$name.log):"; tail -n 20 "$OUT/$name.log"; exit 1; }
  awk -v n="$name" '{printf "| %s | %.1f | %.2f |\n", n, $1, $2 / 1048576}' "$OUT/$name.time" >> "$report"
  tail -n 2 "$OUT/$name.log" | cut -c1-200
}

if [ -n "${VQGAN:-}" ]; then
  VQ=$VQGAN
  stage photos $PY bench/photos.py --out "$D" ${PHOTOS:+--photos "$PHOTOS"}
else
  VQ=$OUT/vq-f16-8192-random
  echo "no VQGAN= given: the tokenizer is the released f16-8192 layout with RANDOM weights (real shapes and costs)"
  stage photos $PY bench/photos.py --out "$D" ${PHOTOS:+--photos "$PHOTOS"} --vqgan_out "$VQ"
fi

# tokenize: single images for stage 1, "image, annotation" pairs for stage 2
stage tokenize_images $PY tokenize_data.py images --input "$D/images/training" --vqgan "$VQ" --out "$T" \
  --name photos --device cpu
stage tokenize_val $PY tokenize_data.py images --input "$D/images/validation" --vqgan "$VQ" --out "$T" \
  --name photos_val --device cpu
stage tokenize_pairs $PY tokenize_data.py pairs --images "$D/images/training" --annotations "$D/annotations/training" \
  --palette ade20k --annotation segmentation --vqgan "$VQ" --out "$T" --name photos_seg --device cpu

# stage 1 at the paper's 300M size, micro-batch 1: four steps unbroken, then two + --resume two more
small="--micro_batch_size=1 --batch_size=2 --max_steps=4 --warmup_steps=2 --eval_interval=2 --eval_iters=1
       --log_interval=1 --num_samples=0 --device=cpu"
rm -rf "$OUT/pretrain" "$OUT/pretrain-resumed" "$OUT/finetune"
stage pretrain $PY pretrain.py --size=300M --data="$T/photos" --val_data="$T/photos_val" $small \
  --out_dir="$OUT/pretrain"
stage pretrain_stop $PY pretrain.py --size=300M --data="$T/photos" --val_data="$T/photos_val" $small \
  --out_dir="$OUT/pretrain-resumed" --stop_at=2
stage pretrain_resume $PY pretrain.py --size=300M --data="$T/photos" --val_data="$T/photos_val" $small \
  --out_dir="$OUT/pretrain-resumed" --resume
$PY - "$OUT" <<'EOF'
import json, sys
losses = lambda d: [json.loads(line)["loss"] for line in open(f"{sys.argv[1]}/{d}/metrics.jsonl")]
unbroken, resumed = losses("pretrain"), losses("pretrain-resumed")
print(f"losses unbroken {unbroken}\n       resumed  {resumed}")
assert unbroken == resumed, "the resumed run differs from the unbroken one"
print("resume: equal step for step")
EOF

# stage 2 from it: 16-image sequences of 4096 tokens, the paper's length
stage finetune $PY finetune.py --init_from="$OUT/pretrain" --data="$T/photos_seg" --mix=discriminative:1 \
  --micro_batch_size=1 --batch_size=1 --max_steps=2 --eval_interval=2 --eval_iters=1 --log_interval=1 \
  --num_samples=0 --probe_sequences=0 --device=cpu --out_dir="$OUT/finetune"

# in context: one prompt pair, then a query; and the segmentation protocol on the held-out photos
first=$(ls "$D/images/training" | head -n 1) query=$(ls "$D/images/validation" | head -n 1)
stage sample $PY sample.py --model "$OUT/finetune" --vqgan "$VQ" --device cpu \
  --prompt "$D/images/training/$first" "$D/colour/training/${first%.*}.png" \
  --query "$D/images/validation/$query" --out_dir "$OUT/sample"
stage evaluate $PY evaluate.py segmentation --model "$OUT/finetune/ckpt.pt" --vqgan "$VQ" --data "$D" --limit 2 \
  --device cpu --features tiny --out "$OUT/eval"

{
  echo
  echo "checkpoints: $(du -sh "$OUT/pretrain/ckpt.pt" | cut -f1) (stage 1 ckpt.pt: weights + AdamW state)," \
       "$(du -sh "$OUT/pretrain/hf" | cut -f1) (its Hugging Face export), $(du -sh "$OUT/finetune/ckpt.pt" | cut -f1)" \
       "(stage 2 ckpt.pt); tokens: $(du -sh "$T" | cut -f1) for $(ls "$D"/images/*/* | wc -l) photos"
  echo "tokenizer: $VQ; machine: $(nproc) cores, $($PY -c 'import torch; print("torch", torch.__version__)')"
} >> "$report"
echo "== report ($report)"
cat "$report"
