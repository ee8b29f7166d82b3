"""Fingerprints of fixed-seed tiny runs of every regime: a refactor must leave them bitwise equal.

Each case trains a tiny student for a few steps and prints one line: the case name, a sha256 of
the final weights (every tensor of `final/*.safetensors`, by name) and a sha256 of the numeric
values of metrics.jsonl (timing and memory fields dropped: they differ from run to run). Record
the output before a change and compare after it:

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/regime_fingerprints.py > /tmp/before.txt
    ... change the code ...
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/regime_fingerprints.py | diff /tmp/before.txt -

`--only NAME ...` runs some cases. Runs on one torch thread; about 15 s on a CPU.

`scripts/regime_fingerprints.expected.txt` is the output recorded on main e36be8b (torch 2.13,
CPU) before the refactor of issue 14, and checked after each of its steps; re-recorded after the
merge of issue 17, whose two new fields of the metrics' info line (`fsdp`,
`student_parameters_local`) changed the metrics hashes only (every weight hash, and the metrics
hashes without those two fields, were unchanged); re-recorded on main 8429aea before the relayout
of issue 34 item 4: the `code` record of every run (provenance, one more line) and the info line's
new numeric fields (`train_skipped`, `train_truncated`, ...) changed the metrics hashes only (every
weight hash unchanged). Bitwise results depend
on the torch build and the hardware: on another machine, record a "before" there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Fields that measure the machine, not the computation.
TIMING = {"elapsed_s", "cpu_s", "tokens_per_s", "step_time_s", "peak_mem_mb"}
COMMON = ["max_steps=3", "data.max_length=48", "regime.max_new_tokens=6", "log.progress=false", "log.tensorboard=off",
          "log.every=1", "log.eval_every=2", "save.every=2", "optim.batch_size=4", "seed=3"]
# name -> overrides ({teacher} and {cache} are filled in)
CASES: dict[str, list[str]] = {
    "dataset-hpd-online": ["teacher.path={teacher}", "objective.name=hpd"],
    "dataset-fkl-logits": ["teacher.path={teacher}", "objective.name=fkl", "objective.chunk_size=0"],
    "dataset-skl-ce-kd-mix": ["teacher.path={teacher}", "objective.name=skl", "objective.ce_weight=0.3",
                              "objective.kd_weight=0.7", "optim.grad_accum=2"],
    "dataset-abkl": ["teacher.path={teacher}", "objective.name=abkl"],
    "dataset-sft-no-teacher": ["teacher.path=none", "objective.name=sft"],
    "teacher-generations": ["teacher.path={teacher}", "regime.name=teacher", "objective.name=fkl"],
    "student-rollouts": ["teacher.path={teacher}", "regime.name=student", "objective.name=rkl"],
    "mixed-teacher": ["teacher.path={teacher}", "regime.name=mixed", "regime.mixed_lambda=0.5",
                      "regime.off_policy=teacher", "objective.name=hpd", "max_steps=4"],
    "mixed-dataset": ["teacher.path={teacher}", "regime.name=mixed", "regime.mixed_lambda=0.5",
                      "regime.off_policy=dataset", "objective.name=jsd", "max_steps=4"],
    "cached-hpd": ["teacher.path={teacher}", "teacher.cache={cache}", "objective.name=hpd"],
    "cached-fkl": ["teacher.path={teacher}", "teacher.cache={cache}", "objective.name=fkl"],
    "lora-hpd": ["teacher.path={teacher}", "objective.name=hpd", "student.lora_rank=4"],
    "self-reference-frozen": ["teacher.path=none", "regime.name=self", "opsd.privileged_field=completion",
                              "opsd.response=reference", "opsd.teacher_weights=frozen", "objective.name=hpd"],
    "self-rollout-ema": ["teacher.path=none", "regime.name=self", "opsd.privileged_field=completion",
                         "opsd.response=rollout", "opsd.teacher_weights=ema", "objective.name=jsd"],
    "self-lora-frozen": ["teacher.path=none", "regime.name=self", "opsd.privileged_field=completion",
                         "opsd.response=rollout", "opsd.teacher_weights=frozen", "objective.name=orkl",
                         "student.lora_rank=4"],
}


def weights_hash(final: Path) -> str:
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for f in sorted(final.glob("*.safetensors")):
        for name, t in sorted(load_file(str(f)).items()):
            h.update(f"{f.name}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def metrics_hash(path: Path) -> tuple[str, int]:
    h, lines = hashlib.sha256(), 0
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        kept = {k: v for k, v in rec.items() if k not in TIMING and (isinstance(v, (int, float)) or k in ("type", "regime"))}
        h.update(json.dumps(kept, sort_keys=True).encode())
        lines += 1
    return h.hexdigest()[:16], lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="case names (default: all)")
    args = ap.parse_args(argv)
    import os

    import torch

    torch.set_num_threads(1)
    os.chdir(REPO)
    from hpd.config import DataConfig, load_config
    from hpd.models.loading import load_model, save_model
    from hpd.teachers.cache import build_teacher_cache
    from hpd.training.trainer import train

    names = args.only or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown cases {unknown}; choose from {list(CASES)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="hpd-fp-") as tmp:
        tmp = Path(tmp)
        model, tok = load_model("tiny", tiny={"num_layers": 2, "hidden_size": 64, "intermediate_size": 128}, seed=7)
        teacher = save_model(model, tok, tmp / "teacher")
        cache = None
        if any("{cache}" in o for n in names for o in CASES[n]):
            cache = build_teacher_cache(teacher, ["examples/tiny.jsonl"], tmp / "cache", top_k=8,
                                        data=DataConfig(max_length=48), log=None)
        for name in names:
            over = [o.format(teacher=teacher, cache=cache) for o in CASES[name]]
            run = tmp / "runs" / name / "run"
            with open(os.devnull, "w") as devnull:
                stdout, sys.stdout = sys.stdout, devnull
                try:
                    train(load_config("configs/tiny.yaml", [*COMMON, f"output_dir={run}", *over]))
                finally:
                    sys.stdout = stdout
            m, n = metrics_hash(run / "metrics.jsonl")
            print(f"{name:24s} weights {weights_hash(run / 'final')} metrics {m} ({n} lines)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
