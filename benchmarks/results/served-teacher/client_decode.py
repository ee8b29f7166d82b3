"""Client CPU of one K=8 answer (the bundled batch: 32 sequences), before and after issue 36's client
changes: json + the per-position parse of every position (commit 8429aea) against orjson + the
one-pass parse of the response's positions (this branch). The answer was captured from vLLM 0.32.

Inputs (a one-off, kept for the record): `git show 8429aea:hpd/teachers/served.py > /tmp/sp/old/served_old.py`;
the bundled recipe's data written by `write_task_data(Path("/tmp/sp/b"), 200, 30, 0)`; ANSWER.json
the raw body of vLLM's answer to `/v1/completions` with the first 32 training sequences as token
ids, `prompt_logprobs=8`, `max_tokens=1` (the engine of benchmarks/served_teacher.py).
Run: PYTHONPATH=. python benchmarks/results/served-teacher/client_decode.py ANSWER.json
(process CPU ms per answer: min and median of 15)."""
import json, sys, time, importlib.util
from pathlib import Path
import orjson
sys.path.insert(0, "/tmp/sp/old")
import served_old
from hpd.teachers.served import parse_prompt_logprobs
from hpd.apps.recipe import BUNDLED_TEACHER, student_config
from hpd.data.encode import encode_file
from hpd.models.loading import load_saved_tokenizer
out = Path("/tmp/sp/b")
cfg = student_config(out/"runs"/"p", BUNDLED_TEACHER, out/"data"/"train.jsonl", out/"data"/"eval.jsonl", objective="hpd", steps=1, seed=0, extra=[])
tok = load_saved_tokenizer(str(BUNDLED_TEACHER))
ex = encode_file(str(out/"data"/"train.jsonl"), tok, cfg.data)[0][:32]
seqs = [list(e.prompt_ids)+list(e.completion_ids) for e in ex]
first = [max(len(e.prompt_ids)-1, 0) for e in ex]
raw = Path(sys.argv[1]).read_bytes()
def old():
    ch = sorted(json.loads(raw)["choices"], key=lambda c: c["index"])
    return [served_old.parse_prompt_logprobs(c["prompt_logprobs"], q, 8) for c, q in zip(ch, seqs)]
def new_all():
    ch = sorted(orjson.loads(raw)["choices"], key=lambda c: c["index"])
    return [parse_prompt_logprobs(c["prompt_logprobs"], q, 8) for c, q in zip(ch, seqs)]
def new():
    ch = sorted(orjson.loads(raw)["choices"], key=lambda c: c["index"])
    return [parse_prompt_logprobs(c["prompt_logprobs"], q, 8, f) for c, q, f in zip(ch, seqs, first)]
import numpy as np
for a, b, f in zip(old(), new(), first):
    for n in ("label_logp", "topk_ids", "topk_logp", "tail"):
        assert np.array_equal(getattr(a, n)[f:], getattr(b, n)[f:]), n
print(f"answer: {len(raw)} bytes, {sum(len(q)-1 for q in seqs)} positions, {sum(len(q)-1-f for q, f in zip(seqs, first))} of them the responses'")
for name, fn in (("json + per-position parse, all positions (before)", old), ("orjson + one-pass parse, all positions", new_all),
                 ("orjson + one-pass parse, the responses' positions (after)", new)):
    ts = []
    for _ in range(15):
        c = time.process_time(); fn(); ts.append(time.process_time() - c)
    print(f"| {name} | {min(ts)*1000:.1f} | {sorted(ts)[7]*1000:.1f} |")
