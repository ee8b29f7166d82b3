"""The model card of a distilled student: `final/README.md`, with Hugging Face metadata.

The card opens with YAML front matter that the Hub (and any YAML reader) parses: `base_model`
(the student's starting weights, when they came from a path), `library_name`, `pipeline_tag`,
`tags`, and what a reader of a distilled model asks first: `teacher`, `objective` (with
`objective_params`), `regime`, `data`, `steps`, and `eval` (the held-out figures of the run's last
evaluation, when it had evaluation data). The body repeats them for people.

    >>> from hpd.config import load_config
    >>> import yaml
    >>> cfg = load_config(None, ["student.path=models/small", "teacher.path=models/big", "max_steps=20"])
    >>> card = model_card(cfg, steps=20, eval_metrics={"kl": 0.25})
    >>> meta = yaml.safe_load(card.split("---")[1])
    >>> meta["base_model"], meta["teacher"], meta["objective"], meta["steps"], meta["eval"]
    ('models/small', 'models/big', 'hpd', 20, {'kl': 0.25})
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from hpd.config import OBJECTIVE_PARAM_FIELDS, Config

# Held-out figures worth a reader's time, in the order shown (the objective's value first).
_EVAL_KEYS = ("value", "kl", "ce", "agreement", "entropy")


def _teacher(cfg: Config) -> str:
    if cfg.teacher.named:  # a teacher per row: every one by name
        default = None if cfg.teacher.path == "none" and not (cfg.teacher.cache or cfg.teacher.server) \
            else _one_teacher(cfg)
        named = [f"{n}: {t.source()[1]}" + ("" if t.path else f" ({t.source()[0]})") for n, t in cfg.teacher.named.items()]
        return "; ".join(([f"default: {default}"] if default else []) + named)
    return _one_teacher(cfg)


def _one_teacher(cfg: Config) -> str:
    if cfg.regime.name == "self":
        return f"self ({cfg.student.path} with privileged context, OPSD)"
    if cfg.teacher.cache:
        return f"{cfg.teacher.path} (cached: {cfg.teacher.cache})"
    if cfg.teacher.server:  # the models the servers named are in metrics.jsonl's info record
        return f"served by {cfg.teacher.server}" + (f" ({cfg.teacher.path})" if cfg.teacher.path not in ("none", "tiny") else "")
    return cfg.teacher.path


def card_metadata(cfg: Config, *, steps: int, eval_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """The front matter of the card of a student trained by `cfg` for `steps` optimizer steps."""
    meta: dict[str, Any] = {}
    base = cfg.teacher.path if cfg.student.path == "teacher" else cfg.student.path
    if base != "tiny":  # a randomly initialised tiny model has no base
        meta["base_model"] = base
    name = cfg.objective.name
    meta.update({
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["hpd", "distillation", "knowledge-distillation", name.rsplit(":", 1)[-1]],
        "teacher": _teacher(cfg),
        "objective": name,
        "objective_params": {p: getattr(cfg.objective, f) for p, f in OBJECTIVE_PARAM_FIELDS.get(name, {}).items()},
        "regime": cfg.regime.name,
        "data": cfg.data.train,
        "steps": int(steps),
    })
    if cfg.student.init_from_teacher:
        meta["student_layers"] = cfg.student.init_from_teacher
    figures = {k: round(float(eval_metrics[k]), 6) for k in _EVAL_KEYS
               if eval_metrics and isinstance(eval_metrics.get(k), (int, float)) and math.isfinite(eval_metrics[k])}
    if figures:
        meta["eval"] = figures
        if cfg.data.eval:
            meta["eval_data"] = cfg.data.eval
    return meta


def model_card(cfg: Config, *, steps: int, eval_metrics: dict[str, Any] | None = None) -> str:
    """The text of `README.md`: YAML front matter (`card_metadata`) and a short description."""
    meta = card_metadata(cfg, steps=steps, eval_metrics=eval_metrics)
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    lines = [
        "---", front.rstrip("\n"), "---", "",
        "# Distilled student", "",
        f"Distilled with [hpd](https://arxiv.org/abs/2604.20244) from `{meta['teacher']}` with the `{meta['objective']}` "
        f"objective ({meta['regime']} regime) on `{meta['data']}`, {meta['steps']} optimizer steps"
        + (f", starting from `{meta['base_model']}`." if "base_model" in meta else ", starting from random weights."),
        "",
    ]
    if "eval" in meta:
        lines += ["Held-out figures of the last evaluation (on the run's evaluation data):", "",
                  "| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in meta["eval"].items()] + [""]
    lines += [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)   # transformers 4.4x-4.5x or 5.x",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "```",
        "",
    ]
    return "\n".join(lines)


__all__ = ["card_metadata", "model_card"]
