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

With `--keep DIR` every model's figures are also kept in DIR (one JSON file per model, e.g. in the
git repository), and a later report reuses them: a run measured once is not measured again while
its config and last logged step are the same, and a run whose weights are gone (a fresh machine)
keeps its row. Generation speed is a ratio to the teacher timed in the same report as the student.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpd.apps.evaluate import EvalResult, evaluate_model
from hpd.apps.experiments import read_records
from hpd.apps.tasks import get_task
from hpd.apps.tasks.capitals import TEMPLATES, countries
from hpd.config import load_config
from hpd.data.collate import build_batch
from hpd.data.encode import encode_file
from hpd.data.rows import load_examples
from hpd.files import atomic_write_text
from hpd.models.from_teacher import init_from_teacher
from hpd.models.loading import load_model
from hpd.objectives import get_objective
from hpd.objectives.base import reduce_metrics
from hpd.responses.rollout import encode_prompts, generate_completions

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
    gen_ratio: float | None = None  # gen_tps over the teacher's, timed in the same report
    chat: list[str] = field(default_factory=list)
    train: dict[str, float] = field(default_factory=dict)
    identity: str = ""  # what was measured (run_identity); a kept row is reused while it matches

    def to_json(self) -> dict[str, Any]:
        c = self.capitals
        return {"model": _name(self), "group": self.group, "method": self.method, "layers": self.layers, "steps": self.steps,
                "capitals_correct": c.correct, "capitals_n": c.n, "capitals_accuracy": c.accuracy,
                "capitals_ci": [c.ci_low, c.ci_high], "capitals_task": c.task, "kl": self.kl, "agreement": self.agreement,
                "generation_tokens_per_s": self.gen_tps, "generation_ratio": self.gen_ratio, "train": self.train,
                "identity": self.identity, "capitals_records": c.records, "chat_answers": self.chat}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Row":
        c = EvalResult(d["capitals_task"], d["capitals_n"], d["capitals_correct"], d["capitals_accuracy"],
                       *d["capitals_ci"], records=d["capitals_records"])
        return cls(d["group"], d["method"], d["layers"], d["steps"], c, d["kl"], d["agreement"],
                   d["generation_tokens_per_s"], d["generation_ratio"], d["chat_answers"], d["train"], d["identity"])


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


def run_identity(run: Path) -> str:
    """A trained run's resolved config and last logged step: another attempt, or more steps, differ."""
    h = hashlib.sha256((run / "config.yaml").read_bytes())
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    h.update(lines[-1].encode() if lines else b"")
    return h.hexdigest()[:16]


def _keep_name(r: Row) -> str:
    return f"{r.group or 'teacher'}-{r.method}.json"


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
    ap.add_argument("--keep", default=None, help="keep every model's figures here and reuse them (see above)")
    args = ap.parse_args()
    root = Path(args.runs)
    runs = find_runs(root)
    keep = Path(args.keep) if args.keep else None
    kept = {p.name: Row.from_json(json.loads(p.read_text())) for p in sorted(keep.glob("*.json"))} if keep and keep.is_dir() else {}
    if not runs and not kept:
        sys.exit(f"error: no finished run (a directory with final/ and config.yaml) under {root}: train first")
    cfg = load_config(runs[0][2] / "config.yaml") if runs else load_config(None, [])
    heldout = args.heldout or cfg.data.eval
    teacher_dir = args.teacher or cfg.teacher.path
    if not heldout or not teacher_dir:
        sys.exit("error: pass --heldout (the teacher's answers to the held-out prompts) and --teacher DIR")
    n_capitals = args.n or len(countries("test")) * len(TEMPLATES)

    teacher, tok = load_model(teacher_dir)
    teacher.eval()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples, _ = encode_file(heldout, tok, cfg.data)
    chat_prompts = [e.prompt for e in load_examples(heldout)[0][: args.samples]]
    # What every figure depends on besides the model: a kept row measured otherwise is measured again.
    setting = hashlib.sha256(json.dumps([n_capitals, args.samples, args.gen_tokens, Path(heldout).read_text(),
                                         (Path(teacher_dir) / "config.json").read_text()]).encode()).hexdigest()[:12]

    teacher_tps: list[float] = []  # the teacher's speed in this report, timed once, when a student needs it

    def measure(model, row: Row, fit: bool = True) -> Row:
        t0 = time.perf_counter()
        row.layers = model.config.num_hidden_layers
        model.eval()
        with torch.no_grad():
            row.capitals = evaluate_model(model, tok, "capitals", n=n_capitals, batch_size=32, max_new_tokens=24)
        if fit:
            row.kl, row.agreement = heldout_fit(model, teacher, examples, pad_id)
        row.chat, row.gen_tps = generation(model, tok, chat_prompts, args.gen_tokens)
        if not teacher_tps:
            teacher_tps.append(row.gen_tps if model is teacher else generation(teacher, tok, chat_prompts, args.gen_tokens)[1])
        row.gen_ratio = row.gen_tps / teacher_tps[0]
        print(f"measured {_name(row)} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if keep is not None:
            atomic_write_text(keep / _keep_name(row), json.dumps(row.to_json(), indent=1, ensure_ascii=False) + "\n")
        return row

    def kept_or(row: Row, model_fn, fit: bool = True) -> Row:
        """The kept row of this model while it measured the same thing; else a measurement."""
        row.identity = f"{setting}-{row.identity}"
        old = kept.pop(_keep_name(row), None)
        if old is not None and old.identity == row.identity:
            return old
        return measure(model_fn(), row, fit)

    rows = [kept_or(Row("", "teacher", 0, kl=0.0, agreement=1.0), lambda: teacher, fit=False)]
    for group in dict.fromkeys(g for g, _, _ in runs):
        group_runs = [(m, run) for g, m, run in runs if g == group]
        spec = load_config(group_runs[0][1] / "config.yaml").student
        label = group or str(spec.init_from_teacher or spec.path).replace(":", "")
        initial = lambda: initial_student(group_runs[0][1], teacher)[0]  # noqa: E731
        rows.append(kept_or(Row(label, "initial", 0, steps=0, identity=str(spec.init_from_teacher or spec.path)), initial))
        for method, run in group_runs:
            stats = train_stats(run)
            row = Row(label, method, 0, steps=int(stats.get("steps", 0)), train=stats, identity=run_identity(run))
            rows.append(kept_or(row, lambda run=run: load_model(str(run / "final"))[0]))
    # Runs measured by an earlier report whose weights are not here (another machine): their kept rows.
    rows += [r for r in kept.values() if r.group and r.identity.startswith(f"{setting}-")]
    rank = {m: i for i, m in enumerate(("initial",) + METHOD_ORDER)}
    rows = rows[:1] + sorted(rows[1:], key=lambda r: (r.group, rank.get(r.method, len(rank)), r.method))

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
              f"| {r.gen_tps:.1f} | {r.gen_ratio:.2f}x |")

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
        atomic_write_text(args.json, json.dumps([r.to_json() for r in rows], indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
