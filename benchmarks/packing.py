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

Two packed layouts: rows no longer than the micro-batch's longest row (`data.pack_length=0`, the
default: attention, quadratic in the row, never costs more than padded) and the whole micro-batch
in one row (no padding at all; with sdpa on a CPU the attention over the long row then costs more
than the padding saved; flash_attention_2's varlen kernel on a GPU does not pay that).

The models are NOT SmolLM2: a random tiny llama student and teacher (`--layers`, `--hidden`) with
hpd's byte-level tokenizer, so a row's length is its byte count (about 4x its SmolLM2 token
count; `--max-length` 640 bytes ~ the recipe's 160 tokens). The padding share is exact for these
lengths and this order; the speed-up is what the padding cost this model on this machine.

Each (data, layout) is trained `--rounds` times, the layouts' order rotating, and timed by the
median over rounds of its trained (completion) tokens per CPU second of the process (what stays
comparable when other jobs share the cores) and per wall second (first `--warmup` steps left
out); one torch thread.

    OMP_NUM_THREADS=1 python benchmarks/packing.py --steps 10 --rounds 2 --layers 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

DATA = {
    "chat": "benchmarks/results/smollm2-recipe/data/teacher_chat_train.jsonl",
    "recipe": "benchmarks/results/smollm2-recipe/data/train.jsonl",
}


def forward_tokens(lengths: list[int], batch: int, steps: int, seed: int, pack_length: int | None) -> tuple[float, float]:
    """(tokens through the forward per step, padding share of them) over the micro-batches `hpd
    train` draws (`EpochSampler`, same seed); pack_length None = padded."""
    from hpd.data.order import EpochSampler
    from hpd.data.packing import Packing

    s = EpochSampler(len(lengths), batch, seed=seed)
    forward = real = 0
    for _ in range(steps):
        rows = [lengths[i] for i in next(s)]
        real += sum(rows)
        if pack_length is None:
            forward += len(rows) * max(rows)
        else:
            p = Packing(rows, width=pack_length)
            forward += len(p.bins) * p.width
    return forward / steps, 1 - real / forward


def run(data: str, pack_length: int | None, out: Path, a) -> dict:
    from hpd.config import load_config
    from hpd.training.trainer import train

    overrides = [f"output_dir={out}", f"data.train={data}", "data.eval_fraction=0", f"data.max_length={a.max_length}",
                 f"data.packing={str(pack_length is not None).lower()}", f"data.pack_length={pack_length or 0}",
                 f"max_steps={a.steps}", f"optim.batch_size={a.batch}",
                 "objective.name=hpd", "log.progress=false", "log.tensorboard=off", "log.every=1", "log.eval_every=0",
                 "log.diagnostics_every=1000000", "save.every=0", f"seed={a.seed}", "resume=never"]
    for role in ("student", "teacher"):
        overrides += [f"{role}.path=tiny", f"{role}.tiny_layers={a.layers}", f"{role}.tiny_hidden={a.hidden}",
                      f"{role}.tiny_heads=4", f"{role}.tiny_intermediate={4 * a.hidden}",
                      f"{role}.tiny_max_positions={max(1024, a.max_length)}"]
    train(load_config("configs/tiny.yaml", overrides))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r.get("type") == "train"]
    steps = [r for r in train if r["step"] > a.warmup]
    # CPU seconds of the process per step (cpu_s is cumulative): the figure that stays comparable
    # when other jobs share the cores; wall seconds are reported beside it.
    cpu = sum(b["cpu_s"] - p["cpu_s"] for p, b in zip(train, train[1:]) if b["step"] > a.warmup)
    return {"tokens_per_s": sum(r["tokens"] for r in steps) / sum(r["step_time_s"] for r in steps),
            "tokens_per_cpu_s": sum(r["tokens"] for r in steps) / cpu,
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

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="hpd-packing-"))
    try:
        table(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def table(a, tmp: Path) -> None:
    from hpd.config import DataConfig
    from hpd.data.encode import encode_file
    from hpd.models.tokenizer import byte_tokenizer

    lines = ["| data | rows | mean / max row (tokens) | layout | forward tokens / step | padding share | "
             "trained tokens / CPU s | speed-up (CPU) | trained tokens / s (wall) | speed-up (wall) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    layouts = {"padded": None, "packed (width: longest row)": 0, "packed (one row)": 10**9}
    for name in a.data:
        enc, _ = encode_file(DATA[name], byte_tokenizer(), DataConfig(max_length=a.max_length))
        lengths = [len(e.prompt_ids) + len(e.completion_ids) for e in enc]
        shape = f"{statistics.fmean(lengths):.0f} / {max(lengths)}"
        results: dict[str, list[dict]] = {k: [] for k in layouts}
        for r in range(a.rounds):  # the order of the layouts rotates from round to round
            order = list(layouts)[r % len(layouts):] + list(layouts)[:r % len(layouts)]
            for layout in order:
                out = tmp / f"{name}-{r}-{list(layouts).index(layout)}"
                results[layout].append(run(DATA[name], layouts[layout], out, a))
        tps = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in results.items()}
        cps = {k: statistics.median(x["tokens_per_cpu_s"] for x in v) for k, v in results.items()}
        for layout, width in layouts.items():
            fwd, share = forward_tokens(lengths, a.batch, a.steps, a.seed, width)
            lines.append(f"| {name} | {results[layout][0]['rows']} | {shape} | {layout} | {fwd:.0f} | {share:.1%} | "
                         f"{cps[layout]:.0f} | {cps[layout] / cps['padded']:.2f} | {tps[layout]:.0f} | "
                         f"{tps[layout] / tps['padded']:.2f} |")
    print(f"\nbatch {a.batch}, {a.steps} steps ({a.warmup} warm-up), median of {a.rounds} rounds; tiny llama "
          f"{a.layers}x{a.hidden} student and teacher, byte tokenizer, max_length {a.max_length}, one thread\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
