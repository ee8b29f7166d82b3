"""Tables for the SmolLM2-135M distillation runs (benchmarks/smollm2_recipe.sh, smollm2_cpu.sh), markdown on stdout.

The runs are found under --runs: `R/<cut>/<method>/final` (several students, smollm2_recipe.sh)
or `R/<method>/final` (one, smollm2_cpu.sh). For the teacher, each initial student (the teacher
layers a run started from, rebuilt from the run's own config) and each trained student:

- capitals: greedy accuracy on the `test` split of the `capitals` task (the held-out countries,
  split by country: never in the recipe's training data, in any phrasing), all of its questions
  by default (each held-out country in every phrasing), with a 95% Wilson interval (the questions
  cluster by country, so the interval is optimistic) and the fraction of the teacher's accuracy;
- KL(p‖q) and top-1 agreement per response token, teacher-forced on --heldout (the teacher's
  greedy answers to the held-out chat prompts), both models over the full vocabulary, here;
- generation speed: greedy new tokens per second, one prompt at a time, on the first --samples
  held-out chat prompts, and its ratio to the teacher's (same process, one after the other);
- training cost, from each run's metrics.jsonl;
- sample answers side by side: the teacher and every student on the same held-out capitals
  questions (distinct countries) and held-out chat prompts.

    python benchmarks/smollm2_report.py --runs runs/smollm2-recipe \\
        --heldout runs/smollm2-recipe/data/teacher_chat_heldout.jsonl --json runs/smollm2-recipe/report.json
    python benchmarks/smollm2_report.py --runs runs/smollm2     # smollm2_cpu.sh: --heldout from the runs' data.eval
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpd.apps.evaluate import evaluate_model
from hpd.apps.experiments import read_records
from hpd.apps.tasks import get_task
from hpd.apps.tasks.capitals import TEMPLATES, countries
from hpd.config import load_config
from hpd.data import build_batch, encode_file, load_examples
from hpd.models import init_from_teacher, load_model
from hpd.objectives import get_objective
from hpd.objectives.base import reduce_metrics
from hpd.rollout import encode_prompts, generate_completions

METHOD_ORDER = ("hpd", "fkl", "sft")


@dataclass
class Row:
    """One model's figures. group: the student (a cut) it belongs to; "" for the teacher."""

    group: str
    method: str
    layers: int
    steps: int | None = None
    capitals: Any = None  # EvalResult
    kl: float | None = None
    agreement: float | None = None
    gen_tps: float | None = None
    chat: list[str] = field(default_factory=list)
    train: dict[str, float] = field(default_factory=dict)


def find_runs(root: Path) -> list[tuple[str, str, Path]]:
    """(group, method, run directory) of every finished run under `root`, grouped, hpd/fkl/sft first."""
    found = [("", p.parent.name, p.parent) for p in root.glob("*/final")]
    found += [(p.parent.parent.name, p.parent.name, p.parent) for p in root.glob("*/*/final")]
    found = [r for r in found if (r[2] / "config.yaml").is_file()]
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(found, key=lambda r: (r[0], rank.get(r[1], len(rank)), r[1]))


def initial_student(run: Path, teacher):
    """The model a run started from: the teacher's layers (`init_from_teacher`) or its `student.path`."""
    s = load_config(run / "config.yaml").student
    if s.init_from_teacher:
        return init_from_teacher(teacher, s.init_from_teacher), s.init_from_teacher
    return load_model(s.path)[0], s.path


@torch.no_grad()
def heldout_fit(student, teacher, examples, pad_id: int, batch_size: int = 4) -> tuple[float, float]:
    """(KL(p‖q), top-1 agreement) per response token of `examples`, full vocabulary, teacher-forced."""
    objective, outputs = get_objective("fkl"), []
    for i in range(0, len(examples), batch_size):
        ex = examples[i:i + batch_size]
        b = build_batch([e.prompt_ids for e in ex], [e.completion_ids for e in ex], pad_id=pad_id)
        t_BTV = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        s_BTV = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        outputs.append(objective(s_BTV, t_BTV, b["labels"], diagnostics=True))
    m = reduce_metrics(outputs)
    return m["kl"], m["agreement"]


def generation(model, tok, prompts, max_new_tokens: int) -> tuple[list[str], float]:
    """Greedy answers to `prompts`, one at a time, and the new tokens per second over all of them."""
    ids = encode_prompts(tok, prompts)
    generate_completions(model, tok, ids[:1], max_new_tokens=2, temperature=0)  # warm-up, not timed
    texts, tokens, t0 = [], 0, time.perf_counter()
    for p in ids:
        out = generate_completions(model, tok, [p], max_new_tokens=max_new_tokens, temperature=0, batch_size=1)[0]
        tokens += len(out)
        texts.append(tok.decode(out, skip_special_tokens=True))
    return texts, tokens / (time.perf_counter() - t0)


def train_stats(run: Path) -> dict[str, float]:
    train = read_records(run, "train")
    if not train:
        return {}
    return {"steps": train[-1]["step"], "step_time_s": statistics.median(r["step_time_s"] for r in train),
            "cpu_s_per_step": train[-1].get("cpu_s", float("nan")) / max(train[-1]["step"], 1),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train),
            "peak_mem_mb": max(r.get("peak_mem_mb", float("nan")) for r in train), "wall_s": train[-1]["elapsed_s"]}


def _short(text: str, n: int = 150) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def _name(r: Row) -> str:
    if not r.group:
        return f"teacher ({r.layers} layers)"
    return f"{r.group} ({r.layers} layers) {r.method}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/smollm2-recipe")
    ap.add_argument("--teacher", default=None, help="[default: the runs' teacher.path]")
    ap.add_argument("--heldout", default=None, help="held-out teacher answers [default: the runs' data.eval]")
    ap.add_argument("--n", type=int, default=0, help="held-out capitals questions (0: all of them)")
    ap.add_argument("--samples", type=int, default=4, help="held-out chat prompts to time generation on and show")
    ap.add_argument("--sample-capitals", type=int, default=4, help="held-out capitals questions to show")
    ap.add_argument("--gen-tokens", type=int, default=64, help="new tokens per timed generation")
    ap.add_argument("--json", default=None, help="also write every figure here")
    args = ap.parse_args()
    root = Path(args.runs)
    runs = find_runs(root)
    if not runs:
        sys.exit(f"error: no finished run (a directory with final/ and config.yaml) under {root}: train first")
    cfg = load_config(runs[0][2] / "config.yaml")
    heldout = args.heldout or cfg.data.eval
    if not heldout:
        sys.exit("error: the runs have no data.eval: pass --heldout (the teacher's answers to the held-out prompts)")
    n_capitals = args.n or len(countries("test")) * len(TEMPLATES)

    teacher, tok = load_model(args.teacher or cfg.teacher.path)
    teacher.eval()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples, _ = encode_file(heldout, tok, cfg.data)
    chat_prompts = [e.prompt for e in load_examples(heldout)[0][: args.samples]]

    def measure(model, row: Row, fit: bool = True) -> Row:
        t0 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            row.capitals = evaluate_model(model, tok, "capitals", n=n_capitals, batch_size=32, max_new_tokens=24)
        if fit:
            row.kl, row.agreement = heldout_fit(model, teacher, examples, pad_id)
        row.chat, row.gen_tps = generation(model, tok, chat_prompts, args.gen_tokens)
        print(f"measured {_name(row)} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        return row

    rows = [measure(teacher, Row("", "teacher", teacher.config.num_hidden_layers), fit=False)]
    rows[0].kl, rows[0].agreement = 0.0, 1.0
    for group in dict.fromkeys(g for g, _, _ in runs):
        group_runs = [(m, run) for g, m, run in runs if g == group]
        model, spec = initial_student(group_runs[0][1], teacher)
        label = group or str(spec).replace(":", "")
        rows.append(measure(model, Row(label, "initial", model.config.num_hidden_layers, steps=0)))
        del model
        for method, run in group_runs:
            model = load_model(str(run / "final"))[0]
            stats = train_stats(run)
            rows.append(measure(model, Row(label, method, model.config.num_hidden_layers,
                                           steps=int(stats.get("steps", 0)), train=stats)))
            del model

    t = rows[0]
    print(f"Held-out: {n_capitals} `capitals` questions about {len(countries('test'))} countries never in training "
          f"(greedy, 24 new tokens); KL and agreement per token on the teacher's answers to "
          f"{len(examples)} held-out chat prompts; generation: greedy, batch 1, up to {args.gen_tokens} new tokens "
          f"on {len(chat_prompts)} held-out chat prompts.\n")
    print("| model | steps | capitals held-out (95% CI) | of the teacher's | KL(p‖q) / token | top-1 agreement "
          "| generation tokens/s | of the teacher's |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r.capitals
        kept = f"{c.accuracy / t.capitals.accuracy:.2f}" if t.capitals.accuracy > 0 else "n/a"
        print(f"| {_name(r)} | {r.steps if r.steps is not None else ''} | {c.correct}/{c.n} = {100 * c.accuracy:.1f}% "
              f"[{100 * c.ci_low:.0f}, {100 * c.ci_high:.0f}] | {kept} | {r.kl:.3f} | {100 * r.agreement:.1f}% "
              f"| {r.gen_tps:.1f} | {r.gen_tps / t.gen_tps:.2f}x |")

    trained = [r for r in rows if r.train]
    if trained:
        print("\nTraining (from metrics.jsonl: medians over the logged steps; CPU s/step is the process's CPU time "
              "over the steps, the cost that stays comparable when other jobs share the machine):\n")
        print("| model | steps | step time s | CPU s/step | response tokens/s | peak RSS MiB | wall s |")
        print("|---|---|---|---|---|---|---|")
        for r in trained:
            s = r.train
            print(f"| {_name(r)} | {s['steps']} | {s['step_time_s']:.2f} | {s['cpu_s_per_step']:.2f} "
                  f"| {s['tokens_per_s']:.1f} | {s['peak_mem_mb']:.0f} | {s['wall_s']:.0f} |")

    print("\nSample answers (greedy), the same held-out prompts for every model:")
    picks, seen = [], set()  # one question per country: the first one asked about it
    for i, item in enumerate(get_task("capitals").generate("test", n_capitals, seed=0)):  # evaluate_model's items
        if item.meta["country"] not in seen and len(picks) < args.sample_capitals:
            seen.add(item.meta["country"])
            picks.append(i)
    for i in picks:
        print(f"\n**{t.capitals.records[i]['prompt']}** (held-out country)\n\n| model | answer | correct |\n|---|---|---|")
        for r in rows:
            rec = r.capitals.records[i]
            print(f"| {_name(r)} | {_short(rec['completion'])} | {'yes' if rec['correct'] else 'no'} |")
    for j, prompt in enumerate(chat_prompts):
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        print(f"\n**{_short(text)}** (held-out chat prompt)\n\n| model | answer |\n|---|---|")
        for r in rows:
            print(f"| {_name(r)} | {_short(r.chat[j])} |")

    if args.json:
        out = [{"model": _name(r), "group": r.group, "method": r.method, "layers": r.layers, "steps": r.steps,
                "capitals_correct": r.capitals.correct, "capitals_n": r.capitals.n,
                "capitals_accuracy": r.capitals.accuracy, "kl": r.kl, "agreement": r.agreement,
                "generation_tokens_per_s": r.gen_tps, "train": r.train,
                "capitals_records": r.capitals.records, "chat_answers": r.chat} for r in rows]
        Path(args.json).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
