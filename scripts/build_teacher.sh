#!/usr/bin/env bash
# Rebuild the bundled teacher (hpd/assets/teacher) from scratch: data, SFT training, evaluation,
# export. About 25 minutes on 2 CPU cores; resumable (rerun after an interruption).
#   bash scripts/build_teacher.sh
set -euo pipefail
cd "$(dirname "$0")/.."
HPD=${HPD:-.venv/bin/hpd}
PY=${PY:-.venv/bin/python}
$HPD data math,code,dialogue --n 8000 --split train --seed 0 --out runs/teacher-data/train.jsonl
$HPD data math,code,dialogue --n 100 --split test --seed 0 --out runs/teacher-data/eval.jsonl
$HPD train configs/teacher.yaml
$PY scripts/export_teacher.py runs/teacher/final hpd/assets/teacher
$HPD eval --model hpd/assets/teacher --task math --task code --task dialogue --n 300
