"""The chunked loss against the plain one on architectures that transform their logits (issue 32).

Gemma 2 caps its logits (`final_logit_softcapping`), Granite divides them (`logits_scaling`), Cohere
multiplies them (`logit_scale`). For each, a tiny random teacher and student (the byte tokenizer,
2 layers, width 64) are saved, `hpd train` runs one fkl step with the plain loss
(`objective.chunk_size=0`, the model's own logits) and with the chunked one (the default), and the
student's KL(teacher || student) on examples/tiny.jsonl (response tokens, the models' own logits)
is printed. The two columns must agree: the step is the same step.

    PYTHONPATH=$PWD python benchmarks/logit_transforms.py --work /tmp/hpd-transforms --sharp 200

The head weights are scaled up (`--gain` for the teacher, `--student-gain`, both x20 by default: a
random head is near uniform, and a near-uniform model hides any logit transform);
`--sharp 200` repeats Gemma 2 with a far sharper teacher, whose logits the cap bites.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ARCHS = {  # model_type -> the transform set as real checkpoints set it
    "gemma2": {"final_logit_softcapping": 30.0},
    "granite": {"logits_scaling": 8.0},
    "cohere": {"logit_scale": 0.0625},
}


def build(model_type: str, extra: dict, seed: int, out: Path, gain: float = 1.0) -> Path:
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING

    from hpd.models.loading import save_model
    from hpd.models.tokenizer import byte_tokenizer

    config = CONFIG_MAPPING[model_type](vocab_size=264, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, head_dim=16,
                                        max_position_embeddings=128, pad_token_id=256, bos_token_id=257,
                                        eos_token_id=258, tie_word_embeddings=False, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(gain)
    return save_model(model, byte_tokenizer(), out)


def kl_to_teacher(student_dir: Path, teacher_dir: Path) -> float:
    """Mean KL(teacher || student) over the response tokens of examples/tiny.jsonl, from the models' logits."""
    from hpd.config import DataConfig
    from hpd.data.collate import build_batch
    from hpd.data.encode import encode_file
    from hpd.models.loading import load_model

    student, tok = load_model(str(student_dir))
    teacher, _ = load_model(str(teacher_dir))
    examples = encode_file(str(ROOT / "examples/tiny.jsonl"), tok, DataConfig(max_length=64))[0]
    b = build_batch([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id=tok.pad_token_id)
    with torch.no_grad():
        p = torch.log_softmax(teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float(), -1)
        q = torch.log_softmax(student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float(), -1)
    active = b["labels"] != -100
    return float((p.exp() * (p - q)).sum(-1)[active].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/hpd-transforms")
    ap.add_argument("--gain", type=float, default=20.0, help="teacher head weights x this (a random head is near uniform)")
    ap.add_argument("--student-gain", type=float, default=20.0, help="student head weights x this")
    ap.add_argument("--sharp", type=float, default=0.0, help="also Gemma 2 with a teacher head x this (e.g. 200)")
    args = ap.parse_args()
    work = Path(args.work)
    cases = [(t, extra, args.gain) for t, extra in ARCHS.items()] + (
        [("gemma2", ARCHS["gemma2"], args.sharp)] if args.sharp else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    work.mkdir(parents=True, exist_ok=True)
    print(f"{'model':16s} {'KL at start':>11s} {'plain (chunk_size=0)':>21s} {'chunked (default)':>18s}")
    for model_type, extra, gain in cases:
        name = f"{model_type} (x{gain:g})"
        teacher = build(model_type, extra, 1, work / f"{model_type}-{gain:g}" / "teacher", gain=gain)
        student = build(model_type, extra, 2, work / f"{model_type}-{gain:g}" / "student", gain=args.student_gain)
        kls = []
        for label, chunk in (("plain", ["objective.chunk_size=0"]), ("chunked", [])):
            out = work / f"{model_type}-{gain:g}" / label
            cmd = [sys.executable, "-m", "hpd.apps.cli", "train", str(ROOT / "configs/tiny.yaml"), f"output_dir={out}",
                   f"student.path={student}", f"teacher.path={teacher}", "objective.name=fkl", "max_steps=1",
                   "log.progress=false", "log.tensorboard=off", "log.eval_every=0", "save.every=0",
                   f"data.train={ROOT / 'examples/tiny.jsonl'}", "optim.warmup_ratio=0", *chunk]
            # cwd: not the checkout, so that `-m hpd.apps.cli` imports the hpd that PYTHONPATH names
            subprocess.run(cmd, check=True, env=env, cwd=work, capture_output=True)
            kls.append(kl_to_teacher(out / "final", teacher))
        print(f"{name:16s} {kl_to_teacher(student, teacher):11.3f} {kls[0]:21.3f} {kls[1]:18.3f}", flush=True)


if __name__ == "__main__":
    main()
