"""Held-out figures of the cross-tokenizer pair (benchmarks/xtok_pair.sh): the student before and after.

For each student (the start, then each trained `final/` directory): the mean per-token
log-likelihood of the teacher's held-out answers (student tokens, the student's own prompt format,
as training encodes them) and the agreement with the teacher, the fraction of those positions
where the student's most probable token is the teacher's answer token (the teacher answered
greedily, so that token is the teacher's own first choice, spelled in the student's tokens).

    python benchmarks/xtok_pair_eval.py --student runs/models/smollm2-135m \
        --data runs/pair/teacher_heldout.jsonl --runs runs/pair/runs/xtok-hpd/final runs/pair/runs/sft/final
"""

from __future__ import annotations

import argparse

import torch


def score(model_dir: str, data: str, max_length: int, batch_size: int) -> dict[str, float]:
    from hpd.config import DataConfig
    from hpd.data.collate import build_batch
    from hpd.data.encode import encode_file
    from hpd.models.loading import load_model

    model, tok = load_model(model_dir)
    model.eval()
    settings = DataConfig(train=data, max_length=max_length)
    rows, _ = encode_file(data, tok, settings)
    ll, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            part = rows[i:i + batch_size]
            b = build_batch([r.prompt_ids for r in part], [r.completion_ids for r in part], pad_id=tok.pad_token_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            labels = b["labels"]
            mask = labels != -100
            logp = torch.log_softmax(logits, -1)
            y = labels.clamp_min(0)
            ll += float(logp.gather(2, y[..., None]).squeeze(-1)[mask].sum())
            agree += int((logits.argmax(-1) == y)[mask].sum())
            n += int(mask.sum())
    return {"rows": len(rows), "tokens": n, "loglik_per_token": ll / n, "agreement": agree / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", required=True, help="the start student (an HF directory)")
    ap.add_argument("--runs", nargs="*", default=[], help="trained students (final/ directories)")
    ap.add_argument("--data", required=True, help="held-out JSONL of prompts with the teacher's completions")
    ap.add_argument("--max-length", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--teacher", default=None, help="(unused; recorded for the command line's symmetry)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"| student | rows | tokens | held-out log-lik / token | agreement with teacher |")
    print("| --- | --- | --- | --- | --- |")
    for d in [args.student, *args.runs]:
        r = score(d, args.data, args.max_length, args.batch_size)
        print(f"| {d} | {r['rows']} | {r['tokens']} | {r['loglik_per_token']:.4f} | {r['agreement']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
