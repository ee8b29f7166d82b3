#!/usr/bin/env bash
# Build the teacher and the pretrained student of the long-generation condition (`hpd bench --data
# longmath`): arithmetic chains of 20 steps whose worked answers run to about 220 tokens (prompts
# about 200), the paper's headline domain scaled to a CPU. Exported in bfloat16 to
# hpd/assets/long-teacher and hpd/assets/students/llama-2x96-long.
#
#   bash scripts/build_long_teacher.sh     # about 55 minutes on one CPU core; resumable
set -euo pipefail
cd "$(dirname "$0")/.."
HPD=${HPD:-.venv/bin/hpd}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=runs/long
mkdir -p "$OUT"
[ -f "$OUT/teacher-train.jsonl" ] || $HPD data math:steps=20 --n 12000 --split train --seed 0 --out "$OUT/teacher-train.jsonl"
[ -f "$OUT/student-train.jsonl" ] || $HPD data math:steps=20 --n 8000 --split train --seed 7 --out "$OUT/student-train.jsonl"
COMMON="teacher.path=none objective.name=sft student.path=tiny student.tiny_heads=4 student.tiny_max_positions=512
  data.max_length=448 data.eval_fraction=0.02 objective.chunk_size=0 optim.batch_size=16 optim.warmup_ratio=0.03
  optim.min_lr_ratio=0.05 log.every=20 log.eval_every=500 save.every=100 save.keep_last=1 resume=auto log.progress=false"
if [ ! -f hpd/assets/long-teacher/config.json ]; then
  $HPD train configs/tiny.yaml output_dir=$OUT/teacher "data.train=$OUT/teacher-train.jsonl" $COMMON \
    student.tiny_layers=4 student.tiny_hidden=192 student.tiny_intermediate=512 max_steps=1500 seed=0 optim.lr=2e-3 \
    optim.weight_decay=0.01
  $PY scripts/export_teacher.py $OUT/teacher/final hpd/assets/long-teacher
fi
if [ ! -f hpd/assets/students/llama-2x96-long/config.json ]; then
  $HPD train configs/tiny.yaml output_dir=$OUT/student "data.train=$OUT/student-train.jsonl" $COMMON \
    student.tiny_layers=2 student.tiny_hidden=96 student.tiny_intermediate=256 student.init_seed=7 max_steps=1500 seed=7 \
    optim.lr=3e-3
  $PY scripts/export_teacher.py $OUT/student/final hpd/assets/students/llama-2x96-long
fi
for m in hpd/assets/long-teacher hpd/assets/students/llama-2x96-long; do
  # An eval is reused only when it is newer than the weights it scored (a rebuilt asset is re-scored).
  [ "$OUT/eval-$(basename $m).txt" -nt "$m/model.safetensors" ] && continue
  $HPD eval --model $m --task math:steps=20 --n 300 --out "$OUT/eval-$(basename $m).jsonl" | tee "$OUT/eval-$(basename $m).txt"
done
