"""On-policy self-distillation (OPSD) on the bundled math task, against SFT on the same references.

A base model that can read a reference solution but is weak at solving alone (`configs/opsd-base.yaml`:
SFT on math problems, most with the reference in the prompt, stopped early) is trained from
(question, reference solution) pairs only, for the same number of optimizer steps with the same
batch and learning rate, by:

- `sft`: cross-entropy on the reference solutions (regime dataset, no teacher);
- OPSD (`regime.name=self`, frozen teacher = the base model shown the reference):
  `hpd` on the reference as the offline prefix (no generation), and `hpd`, `jsd`, `orkl` on the
  student's own rollouts.

It prints (and writes to OUT/results-STEPS.md) held-out greedy accuracy before and after with 95% Wilson
intervals, the accuracy of the privileged teacher (the base model generating with the reference in
its prompt), the student tokens generated, the teacher tokens scored and the training wall time.
Everything is resumable: finished runs and evaluations are skipped when run again.

    python benchmarks/opsd_math.py all --out runs/opsd           # data, base model, runs, table
    python benchmarks/opsd_math.py probe runs/opsd/base/checkpoints/step-00000400/model
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hpd.config import load_config  # noqa: E402
from hpd.files import atomic_write_text  # noqa: E402
from hpd.apps.experiments import run_slug  # noqa: E402

TASK = "math"  # the default: 4 steps, values up to 999
TEMPLATE = load_config(None).opsd.teacher_template
N_PRETRAIN, N_TRAIN, N_EVAL = 6000, 4000, 300
# label -> overrides on top of the common ones
METHODS: dict[str, list[str]] = {
    "sft (references)": ["objective.name=sft", "regime.name=dataset", "data.completion_field=reference"],
    "opsd hpd (reference prefix)": ["objective.name=hpd", "regime.name=self", "opsd.response=reference"],
    "opsd hpd (rollouts)": ["objective.name=hpd", "regime.name=self"],
    "opsd jsd (rollouts)": ["objective.name=jsd", "objective.beta=0.5", "regime.name=self"],
    "opsd orkl (rollouts)": ["objective.name=orkl", "regime.name=self"],
}


def write_data(out: Path, n_pretrain: int = N_PRETRAIN, n_train: int = N_TRAIN) -> None:
    """pretrain.jsonl (base model), train.jsonl ({prompt, reference, answer, meta} rows) under OUT/data.

    `answer` and `meta` are what the math task's verifier reads (the GRPO reward of opsd_vs_grpo.py).
    """
    from hpd.data.encode import privileged_prompt
    from hpd.apps.tasks import get_task

    data = out / "data"
    if (data / "train.jsonl").is_file():
        return
    data.mkdir(parents=True, exist_ok=True)
    task = get_task(TASK)
    rows = []
    for i, it in enumerate(task.generate("train", n_pretrain, seed=1)):
        rows.append({"prompt": privileged_prompt(it.prompt, it.reference, TEMPLATE), "completion": it.reference})
        if i % 3 == 0:  # a third also without the reference
            rows.append({"prompt": it.prompt, "completion": it.reference})
    random.Random(0).shuffle(rows)
    with open(data / "pretrain.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(data / "train.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": it.prompt, "reference": it.reference, "answer": it.answer, "meta": it.meta}) + "\n"
                     for it in task.generate("train", n_train, seed=0))


def accuracy(model_dir: Path | str, *, privileged: bool = False, n: int = N_EVAL) -> dict[str, float]:
    """Greedy held-out accuracy on the math task; `privileged` puts the reference in the prompt."""
    import torch

    from hpd.apps.evaluate import wilson_interval
    from hpd.models.loading import load_model
    from hpd.data.encode import privileged_prompt
    from hpd.responses.rollout import generate_text
    from hpd.apps.tasks import get_task

    task = get_task(TASK)
    items = task.generate("test", n, seed=0)
    model, tok = load_model(str(model_dir))
    prompts = [privileged_prompt(i.prompt, i.reference, TEMPLATE) if privileged else i.prompt for i in items]
    with torch.no_grad():
        outs = generate_text(model, tok, prompts, max_new_tokens=task.max_new_tokens, temperature=0.0, batch_size=100)
    correct = sum(task.verify(i, o) for i, o in zip(items, outs))
    lo, hi = wilson_interval(correct, n)
    return {"accuracy": correct / n, "ci_low": lo, "ci_high": hi, "n": n, "correct": correct}


def cached_accuracy(out: Path, model_dir: Path, key: str, *, n: int = N_EVAL, **kw) -> dict[str, float]:
    """`accuracy`, cached under OUT/evals (never inside the model's directory), keyed by model, view and n."""
    name = "-".join(Path(model_dir).resolve().relative_to(Path(out).resolve()).parts)
    path = Path(out) / "evals" / f"{name}-{key}-n{n}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(accuracy(model_dir, n=n, **kw)))
    return json.loads(path.read_text())


def build_base(out: Path, overrides: list[str] = ()) -> Path:
    """Train (or reuse) the base model of `configs/opsd-base.yaml` on OUT/data/pretrain.jsonl; its final/ directory."""
    from hpd.apps.experiments import run_configs

    cfg = load_config(str(ROOT / "configs" / "opsd-base.yaml"),
                      [f"output_dir={out / 'base'}", f"data.train={out / 'data' / 'pretrain.jsonl'}", *overrides])
    run_configs([cfg], jobs=1, labels=["base"], threads_per_job=1)
    return out / "base" / "final"


def run_config(out: Path, label: str, steps: int, extra: list[str], lr: float = 1e-3, *, seed: int = 0,
               run_dir: Path | None = None):
    """The hpd config of one method: the common settings (batch 16, constant lr), then `extra`."""
    tag = f"{steps}" if lr == 1e-3 else f"{steps}-lr{lr:g}"
    run_dir = run_dir or out / "runs" / f"{run_slug(label)}-{tag}"
    common = [
        f"output_dir={run_dir}", f"max_steps={steps}", f"seed={seed}",
        f"student.path={out / 'base' / 'final'}", "student.dtype=float32", "teacher.path=none",
        f"data.train={out / 'data' / 'train.jsonl'}", "data.max_length=256",
        "opsd.privileged_field=reference", "objective.chunk_size=0",
        "regime.max_new_tokens=96", "regime.temperature=1.0",
        f"optim.lr={lr}", "optim.batch_size=16", "optim.warmup_ratio=0.05", "optim.schedule=constant",
        "log.every=5", "log.diagnostics_every=5", "log.progress=false", "log.tensorboard=off",
        "save.every=50", "save.keep_last=1",
    ]
    return load_config(None, [*common, *extra])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["all", "data", "probe"])
    ap.add_argument("model", nargs="?", help="probe: a model directory")
    ap.add_argument("--out", type=Path, default=Path("runs/opsd"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated labels")
    ap.add_argument("--n", type=int, default=N_EVAL)
    ap.add_argument("--lr", type=float, default=1e-3, help="learning rate of every method")
    a = ap.parse_args(argv)
    if a.what == "probe":
        for privileged in (False, True):
            r = accuracy(a.model, privileged=privileged, n=a.n)
            print(f"{'privileged' if privileged else 'plain':10s} {r['correct']}/{r['n']} = {100 * r['accuracy']:.1f}%")
        return
    write_data(a.out)
    if a.what == "data":
        return
    from hpd.apps.experiments import read_records, run_configs

    base = build_base(a.out)
    labels = [m for m in a.methods.split(",") if m]
    cfgs = [run_config(a.out, m, a.steps, METHODS[m], a.lr) for m in labels]
    run_configs(cfgs, jobs=1, labels=labels, threads_per_job=1)

    before = cached_accuracy(a.out, base, "plain", n=a.n)
    teacher = cached_accuracy(a.out, base, "privileged", n=a.n, privileged=True)

    def pct(r):
        return f"{100 * r['accuracy']:.1f} ({100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f})"

    lines = [
        f"Base model {base}: held-out accuracy {pct(before)}; the same model with the reference in its prompt "
        f"(the privileged teacher) {pct(teacher)}. {a.steps} steps, batch 16, lr {a.lr:g}, {a.n} held-out problems, greedy.",
        "",
        "| method | accuracy % before | accuracy % after (95% CI) | student tokens generated | teacher tokens scored "
        "| train wall s | KL(teacher‖student) on the training responses, first → last |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for label, cfg in zip(labels, cfgs):
        run_dir = Path(cfg.output_dir)
        after = cached_accuracy(a.out, run_dir / "final", "plain", n=a.n)
        records = read_records(run_dir)
        last = records[-1]
        # Mean of the first and of the last 4 logged values (the privileged teacher's view; none for sft).
        kls = [r["kl"] for r in records if r.get("kl") is not None]
        kl = f"{sum(kls[:4]) / len(kls[:4]):.2f} → {sum(kls[-4:]) / len(kls[-4:]):.2f}" if kls else "-"
        lines.append(f"| {label} | {100 * before['accuracy']:.1f} | {pct(after)} | {int(last['generated_tokens_total'])} | "
                     f"{int(last['teacher_tokens_total'])} | {last['elapsed_s']:.0f} | {kl} |")
    text = "\n".join(lines)
    (a.out / f"results-{a.steps}{'' if a.lr == 1e-3 else f'-lr{a.lr:g}'}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
