"""The config rules across fields and sections (a teacher cache needs the dataset regime, the
self regime needs teacher.path=none, ...): each returns its problems as one-line messages, which
`hpd.config.validate` raises once the fields themselves are well typed and in range.

    >>> from hpd.config import Config
    >>> cfg = Config()
    >>> cfg.regime.name = "self"
    >>> cross_checks(cfg)
    ["regime.name=self: the student is its own teacher, but teacher.path is 'tiny'; set teacher.path=none"]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hpd.objectives import objective_class

if TYPE_CHECKING:  # the checks read a config's attributes; hpd.config imports this module
    from hpd.config import Config, ModelConfig

# The most parameters a 'tiny' model may have: beyond, building it would exhaust memory, not fail.
TINY_MAX_PARAMETERS = 2 * 10**9

# The objectives that work across tokenizers (teacher.cross_tokenizer=true): those that read the
# teacher at the student's own tokens (per aligned text span), and ULD.
XTOK_OBJECTIVES = ("hpd", "orkl", "sft", "uld")


def cross_checks(cfg: Config) -> list[str]:
    """Rules that involve more than one field."""
    problems: list[str] = []
    no_teacher = cfg.teacher.path.strip().lower() == "none"
    self_regime = cfg.regime.name == "self"
    if cfg.teacher.cache is not None and cfg.regime.name != "dataset":
        problems.append(
            f"teacher.cache holds the teacher on the data's sequences only, but regime.name is "
            f"{cfg.regime.name!r} (new sequences need the teacher itself): use regime.name=dataset, "
            f"or set teacher.cache=null"
            + (". For teacher-generated data with a cache, write it once with `hpd generate --model TEACHER "
               "--prompts FILE --out GEN.jsonl`, cache it with `hpd cache-teacher --data GEN.jsonl`, and train "
               "on GEN.jsonl with regime.name=dataset" if cfg.regime.name == "teacher" else "")
        )
    served = cfg.teacher.server is not None
    if served:
        for bad, why in ((cfg.teacher.cache is not None, "teacher.cache is set too: choose one"),
                         (self_regime, "regime.name=self: the student is its own teacher"),
                         (cfg.regime.name == "teacher" or (cfg.regime.name == "mixed" and cfg.regime.off_policy == "teacher"),
                          "teacher generations need the teacher model here: use regime.name=dataset or student"),
                         (cfg.student.init_from_teacher is not None, "student.init_from_teacher needs the teacher's weights"),
                         (cfg.objective.temperature != 1.0, "a server returns log-probabilities at temperature 1: "
                                                             "set objective.temperature=1"),
                         # the exact scorer reads positions of the padded rows, not of a packed batch
                         (cfg.teacher.server_exact_samples and cfg.data.packing,
                          "teacher.server_exact_samples does not work with data.packing yet: set one of them to false")):
            if bad:
                problems.append(f"teacher.server ({cfg.teacher.server}): {why}")
    needs_teacher = objective_class(cfg.objective.name).needs_teacher
    if no_teacher and needs_teacher and cfg.teacher.cache is None and not self_regime and not served and not cfg.teacher.named:
        problems.append(
            f"teacher.path: 'none' is allowed only with objective.name=sft, teacher.cache or regime.name=self "
            f"(objective.name is {cfg.objective.name!r}); name a teacher model, set teacher.cache, or use sft"
        )
    if self_regime and not no_teacher:
        problems.append(
            f"regime.name=self: the student is its own teacher, but teacher.path is "
            f"{cfg.teacher.path!r}; set teacher.path=none"
        )
    if self_regime and not needs_teacher:
        problems.append(
            "regime.name=self with objective.name=sft: sft never reads the teacher; for SFT on "
            "the reference solutions use regime.name=dataset with data.completion_field set to them"
        )
    if cfg.teacher.cross_tokenizer:
        if cfg.objective.name not in XTOK_OBJECTIVES:
            problems.append(
                f"teacher.cross_tokenizer=true: objective '{cfg.objective.name}' needs one vocabulary for both "
                f"models; across tokenizers use one of {', '.join(XTOK_OBJECTIVES)} (uld for a vocabulary-sized loss)"
            )
        if cfg.teacher.cache is None and (no_teacher or cfg.teacher.path.strip() == "tiny") and served:
            problems.append("teacher.cross_tokenizer=true with teacher.server tokenizes the teacher's sequences here: "
                            "set teacher.path to a directory holding the served teacher's tokenizer")
        elif cfg.teacher.cache is None and no_teacher and not served:
            problems.append("teacher.cross_tokenizer=true needs a teacher: teacher.path, teacher.cache (built with "
                            "`hpd cache-teacher --student DIR`) or teacher.server")
        if cfg.regime.name not in ("dataset", "student"):
            problems.append(
                f"teacher.cross_tokenizer=true works with regime.name dataset or student, not {cfg.regime.name!r}: "
                "write teacher answers once with `hpd generate --model TEACHER` and train on them with regime.name=dataset"
            )
        if cfg.student.init_from_teacher is not None:
            problems.append("teacher.cross_tokenizer=true: student.init_from_teacher builds the student with the "
                            "teacher's tokenizer; load a student of its own tokenizer instead")
    template = cfg.opsd.teacher_template
    for slot in ("{privileged}", "{prompt}"):
        if self_regime and template.count(slot) != 1:
            problems.append(
                f"opsd.teacher_template must hold {slot} exactly once, got {template!r}"
            )
    if no_teacher and (
        cfg.regime.name == "teacher"
        or (cfg.regime.name == "mixed" and cfg.regime.off_policy == "teacher")
    ):
        problems.append(
            "regime: teacher generations need a teacher, but teacher.path is 'none'; "
            "name a teacher model or use regime.name=dataset"
        )
    init = cfg.student.init_from_teacher
    if init is not None and no_teacher:
        problems.append(
            f"student.init_from_teacher ({init!r}) builds the student from the teacher, but "
            "teacher.path is 'none'; name a teacher model or set student.init_from_teacher=null"
        )
    if init is not None and cfg.teacher.cache is not None:
        problems.append(
            f"student.init_from_teacher ({init!r}) needs the teacher's weights, but with teacher.cache "
            "set the teacher is never loaded: build the student once with "
            "hpd.models.from_teacher.save_student_from_teacher(TEACHER, LAYERS, DIR) and pass DIR as student.path"
        )
    if init is not None and cfg.student.path not in ("tiny", "teacher"):
        problems.append(
            f"student.path ({cfg.student.path!r}) and student.init_from_teacher ({init!r}) both "
            "say where the student comes from: set student.path=teacher, or "
            "student.init_from_teacher=null to load student.path"
        )
    if init is None and cfg.student.path == "teacher":
        problems.append(
            "student.path=teacher needs student.init_from_teacher, the teacher layers to keep "
            "(e.g. every:3, spread:10, or 0,5,9)"
        )
    for section in ("student", "teacher"):
        model: ModelConfig = getattr(cfg, section)
        if model.path == "tiny" and model.tiny_hidden % model.tiny_heads:
            problems.append(
                f"{section}.tiny_hidden ({model.tiny_hidden}) must be divisible by "
                f"{section}.tiny_heads ({model.tiny_heads})"
            )
        h, i = model.tiny_hidden, model.tiny_intermediate
        n = model.tiny_layers * (4 * h * h + 3 * h * i) + 2 * 512 * h  # attention, MLP, embeddings and head
        if model.path == "tiny" and n > TINY_MAX_PARAMETERS:
            problems.append(
                f"{section}: the 'tiny' model of tiny_layers={model.tiny_layers}, tiny_hidden={h}, "
                f"tiny_intermediate={i} would have about {n:.2g} parameters (at most {TINY_MAX_PARAMETERS:.0g}): "
                "make it smaller, or load a real model with path=DIR"
            )
    problems += _reuse_checks(cfg)
    problems += _named_checks(cfg)
    report_to = cfg.log.report_to
    if "none" in report_to and len(set(report_to)) > 1:
        problems.append(f"log.report_to: 'none' means no tracker, but it lists {report_to}: give 'none' alone, "
                        "or the trackers without it")
    if "tensorboard" in report_to and cfg.log.tensorboard == "off":
        problems.append("log.report_to lists tensorboard but log.tensorboard is off: drop one of them")
    if len(set(report_to)) != len(report_to):
        problems.append(f"log.report_to lists a tracker twice: {report_to}")
    if cfg.data.eval is not None and cfg.data.eval_fraction > 0:
        problems.append(
            f"data.eval_fraction ({cfg.data.eval_fraction}) splits train only when data.eval is "
            f"null, but data.eval is {cfg.data.eval!r}; set one of them"
        )
    return problems


def _named_checks(cfg: Config) -> list[str]:
    """A teacher per row (teacher.named): each entry one source, and what routing does not combine with."""
    named, problems = cfg.teacher.named, []
    if not named:
        return problems
    for name, t in named.items():
        given = [k for k in ("path", "cache", "server") if getattr(t, k) is not None]
        if len(given) != 1:
            problems.append(f"teacher.named.{name}: give exactly one of path, cache or server, got "
                            f"{', '.join(given) or 'none'}")
        elif t.path is not None and t.path.strip().lower() in ("tiny", "none"):
            problems.append(f"teacher.named.{name}.path: {t.path!r} is not a model; name a model directory or Hub id")
        if t.cache is not None and cfg.regime.name != "dataset":
            problems.append(f"teacher.named.{name}.cache holds the teacher on the data's sequences only, but "
                            f"regime.name is {cfg.regime.name!r}: use regime.name=dataset")
        if t.server is not None and cfg.objective.temperature != 1.0:
            problems.append(f"teacher.named.{name}.server: a server returns log-probabilities at temperature 1: "
                            "set objective.temperature=1")
    if "default" in named:
        problems.append("teacher.named: 'default' names the teacher of the teacher section (path, cache or "
                        "server), the one of rows without a teacher; call this one otherwise")
    if any(t.server is not None for t in named.values()) and cfg.teacher.server_exact_samples and cfg.data.packing:
        problems.append("teacher.named: teacher.server_exact_samples does not work with data.packing yet: set one "
                        "of them to false")
    for bad, why in ((cfg.regime.name == "self", "regime.name=self: the student is its own teacher"),
                     (cfg.regime.name == "teacher" or (cfg.regime.name == "mixed" and cfg.regime.off_policy == "teacher"),
                      "teacher generations would come from one teacher: write each teacher's answers with `hpd "
                      "generate` and train on them with regime.name=dataset"),
                     (cfg.teacher.cross_tokenizer, "teacher.cross_tokenizer=true: every teacher must share the "
                                                   "student's tokenizer"),
                     (cfg.data.streaming, "data.streaming=true: the rows' teachers are read with the data at start; "
                                          "set data.streaming=false")):
        if bad:
            problems.append(f"teacher.named ({', '.join(named)}) does not work with {why}")
    return problems


def _reuse_checks(cfg: Config) -> list[str]:
    """Rollout reuse (regime.minibatches x regime.epochs > 1) and its clip range."""
    r, problems = cfg.regime, []
    if 0 < r.dual_clip <= 1:
        problems.append(f"regime.dual_clip must be > 1 (or 0 = off), got {r.dual_clip}")
    if r.minibatches * r.epochs == 1:
        return problems
    rollouts = r.name == "student" or (r.name == "self" and cfg.opsd.response == "rollout")
    if not rollouts:
        problems.append(
            f"regime.minibatches={r.minibatches} regime.epochs={r.epochs} reuse student rollouts, but "
            f"regime.name={r.name!r}{' with opsd.response=reference' if r.name == 'self' else ''} has none"
            f"{' (mixed draws its regime per step)' if r.name == 'mixed' else ''}: use regime.name=student "
            "(or self with opsd.response=rollout), or set both to 1")
    if objective_class(cfg.objective.name).support == "vocab":
        problems.append(
            f"regime.minibatches/epochs > 1 clip the ratio of sampled tokens, but objective.name="
            f"{cfg.objective.name!r} weighs the whole vocabulary: reuse rollouts with orkl or hpd, or set "
            "regime.minibatches=1 regime.epochs=1")
    return problems

