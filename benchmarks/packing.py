"""Sequence packing against padding: tokens per second and the share of padding in the forward.

`hpd train` (objective hpd, online teacher) on two data sets of chat rows of mixed length, each
trained padded (`data.packing=false`: every micro-batch padded to its longest row) and packed
(`data.packing=true`: the micro-batch's rows end to end, no padding), at the same steps, batch,
seed and order:

- chat: the shipped chat prompts (the train split of `examples/chat_prompts.jsonl`) with the
  SmolLM2-135M-Instruct teacher's answers to them, as the SmolLM2 recipe keeps them
  (`benchmarks/results/smollm2-recipe/data/teacher_chat_train.jsonl`);
- recipe: the SmolLM2 recipe's whole training file (`.../data/train.jsonl`: the chat answers and
  the capital-city questions).

The models are NOT SmolLM2: a random tiny llama student and teacher (`--layers`, `--hidden`) with
hpd's byte-level tokenizer, so a row's length is its byte count (about 4x its SmolLM2 token
count; `--max-length` 640 bytes ~ the recipe's 160 tokens). The padding share is exact for these
lengths and this order; the speed-up is what the padding cost this model on this machine.

Each (data, layout) is trained `--rounds` times, the layouts alternating, and timed by the median
over rounds of its tokens per second (first `--warmup` steps left out); one torch thread.

    OMP_NUM_THREADS=1 python benchmarks/packing.py --steps 30 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

DATA = {
    "chat": "benchmarks/results/smollm2-recipe/data/teacher_chat_train.jsonl",
    "recipe": "benchmarks/results/smollm2-recipe/data/train.jsonl",
}


def padding_share(lengths: list[int], batch: int, steps: int, seed: int) -> tuple[float, float, float]:
    """(padded forward tokens per step, packed forward tokens per step, padding share of the padded
    forward) over the micro-batches `hpd train` draws (`EpochSampler`, same seed)."""
    from hpd.data import EpochSampler

    s = EpochSampler(len(lengths), batch, seed=seed)
    padded = packed = 0
    for _ in range(steps):
        rows = [lengths[i] for i in next(s)]
        padded += len(rows) * max(rows)
        packed += sum(rows)
    return padded / steps, packed / steps, 1 - packed / padded


def run(data: str, pack: bool, out: Path, a) -> dict:
    from hpd.config import load_config
    from hpd.trainer import train

    overrides = [f"output_dir={out}", f"data.train={data}", "data.eval_fraction=0", f"data.max_length={a.max_length}",
                 f"data.packing={str(pack).lower()}", f"max_steps={a.steps}", f"optim.batch_size={a.batch}",
                 "objective.name=hpd", "log.progress=false", "log.tensorboard=off", "log.every=1", "log.eval_every=0",
                 "log.diagnostics_every=1000000", "save.every=0", f"seed={a.seed}", "resume=never"]
    for role in ("student", "teacher"):
        overrides += [f"{role}.path=tiny", f"{role}.tiny_layers={a.layers}", f"{role}.tiny_hidden={a.hidden}",
                      f"{role}.tiny_heads=4", f"{role}.tiny_intermediate={4 * a.hidden}",
                      f"{role}.tiny_max_positions={max(1024, a.max_length)}"]
    train(load_config("configs/tiny.yaml", overrides))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r.get("type") == "train" and r["step"] > a.warmup]
    return {"tokens_per_s": sum(r["tokens"] for r in steps) / sum(r["step_time_s"] for r in steps),
            "step_s": statistics.median(r["step_time_s"] for r in steps),
            "rows": next(r for r in recs if r.get("type") == "info")["train_rows"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=640)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", nargs="*", default=list(DATA), choices=list(DATA))
    a = ap.parse_args()

    import torch

    from hpd.config import DataConfig
    from hpd.data import encode_file
    from hpd.tokenizer import byte_tokenizer

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="hpd-packing-"))
    lines = ["| data | rows | mean / max row (tokens) | layout | forward tokens / step | padding share | "
             "trained tokens/s | step (s) | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for name in a.data:
        enc, _ = encode_file(DATA[name], byte_tokenizer(), DataConfig(max_length=a.max_length))
        lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in enc]
        pad_fwd, pack_fwd, share = padding_share(lengths, a.batch, a.steps, a.seed)
        results: dict[bool, list[dict]] = {False: [], True: []}
        for r in range(a.rounds):
            for pack in ((False, True) if r % 2 == 0 else (True, False)):
                results[pack].append(run(DATA[name], pack, tmp / f"{name}-{pack}-{r}", a))
        tps = {p: statistics.median(x["tokens_per_s"] for x in v) for p, v in results.items()}
        step = {p: statistics.median(x["step_s"] for x in v) for p, v in results.items()}
        shape = f"{statistics.fmean(lengths):.0f} / {max(lengths)}"
        rows = results[False][0]["rows"]
        lines.append(f"| {name} | {rows} | {shape} | padded | {pad_fwd:.0f} | {share:.1%} | {tps[False]:.0f} | "
                     f"{step[False]:.3f} | 1.00 |")
        lines.append(f"| {name} | {rows} | {shape} | packed | {pack_fwd:.0f} | 0.0% | {tps[True]:.0f} | "
                     f"{step[True]:.3f} | {tps[True] / tps[False]:.2f} |")
    print(f"\nbatch {a.batch}, {a.steps} steps ({a.warmup} warm-up), median of {a.rounds} rounds; tiny llama "
          f"{a.layers}x{a.hidden} student and teacher, byte tokenizer, max_length {a.max_length}, one thread\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
