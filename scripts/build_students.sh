#!/usr/bin/env bash
# Build the pretrained students and the trace writer that `hpd bench` and `hpd demo` start from
# (hpd/assets/students/). Each is a tiny byte-level model trained with plain SFT on a slice of the
# three tasks' gold data (a slice of its own: seed 7, never the benchmark's rows), long enough to do
# the tasks partly (1000 steps of batch 32: about a quarter of the teacher's accuracy), then exported in bfloat16 (well under 1 MB each).
#
#   bash scripts/build_students.sh              # about 12 minutes on one CPU core; resumable
#   bash scripts/build_students.sh qwen2-2x96   # only the named ones (two shells build two at once)
#
#   llama-2x96   the default student (2 layers, hidden 96, 0.27M parameters), Llama
#   qwen2-2x96   the same size in another family (Qwen2)
#   llama-3x128  a larger student (3 layers, hidden 128, 0.7M parameters)
#   writer       a model of another shape (Qwen2, 3 layers, hidden 128; 1000 steps) that writes the
#                "traces of another model" data condition, its own mistakes kept
set -euo pipefail
cd "$(dirname "$0")/.."
HPD=${HPD:-.venv/bin/hpd}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=runs/students
mkdir -p "$OUT"
[ -f "$OUT/train.jsonl" ] || $HPD data math,code,dialogue --n 1200 --split train --seed 7 --out "$OUT/train.jsonl"

WANT=" ${*:-llama-2x96 qwen2-2x96 llama-3x128 writer} "
build() {  # name arch layers hidden intermediate steps
  local name=$1 arch=$2 layers=$3 hidden=$4 inter=$5 steps=$6
  [[ "$WANT" == *" $name "* ]] || return 0
  if [ ! -f "hpd/assets/students/$name/config.json" ]; then
    $HPD train configs/tiny.yaml "output_dir=$OUT/$name" data.eval_fraction=0.05 teacher.path=none objective.name=sft "data.train=$OUT/train.jsonl" \
      student.path=tiny "student.tiny_arch=$arch" "student.tiny_layers=$layers" "student.tiny_hidden=$hidden" \
      student.tiny_heads=4 "student.tiny_intermediate=$inter" student.tiny_max_positions=256 student.init_seed=7 \
      data.max_length=160 objective.chunk_size=0 "max_steps=$steps" seed=7 optim.lr=3e-3 optim.batch_size=32 \
      optim.warmup_ratio=0.05 optim.min_lr_ratio=0.1 log.every=20 save.every=100 save.keep_last=1 resume=auto \
      log.progress=false
    $PY scripts/export_teacher.py "$OUT/$name/final" "hpd/assets/students/$name"
  fi
}
build llama-2x96 llama 2 96 256 1000
build qwen2-2x96 qwen2 2 96 256 1000
build llama-3x128 llama 3 128 384 1000
build writer qwen2 3 128 384 1000
for name in $WANT; do
  for task in math code dialogue; do
    $HPD eval --model "hpd/assets/students/$name" --task $task --n 300 --out "$OUT/eval-$name-$task.jsonl"
  done | tee "$OUT/eval-$name.txt"
done
