"""Config dataclasses: YAML round trip, overrides, type conversion, validation messages, help."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
import yaml

from hpd.config import (
    OBJECTIVE_NAMES,
    Config,
    config_from_dict,
    config_help,
    config_to_dict,
    iter_fields,
    load_config,
    save_config,
    validate,
)
from hpd.errors import HPDError


def _write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- defaults and round trips


def test_defaults_are_valid_and_match_the_spec():
    cfg = load_config(None)
    assert cfg == Config()
    assert (cfg.output_dir, cfg.max_steps, cfg.seed, cfg.resume) == ("runs/hpd", 100, 0, "auto")
    assert (cfg.student.tiny_layers, cfg.student.tiny_hidden) == (2, 64)
    # the teacher inherits the model fields with larger tiny defaults
    assert (cfg.teacher.tiny_layers, cfg.teacher.tiny_hidden, cfg.teacher.tiny_intermediate) == (
        4,
        128,
        256,
    )
    assert cfg.objective.name == "hpd" and cfg.regime.name == "dataset"
    assert cfg.student.init_seed is None and cfg.data.eval is None


def test_nondefault_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(
        None,
        [
            "optim.lr=3e-4",
            "objective.name=jsd",
            "data.eval=eval.jsonl",
            "student.init_seed=7",
            "log.tensorboard=off",
            "optim.mixed_precision=no",
            "output_dir=2024",  # a str field that looks like a number
        ],
    )
    for comments in (False, True):
        path = save_config(cfg, tmp_path / f"c{comments}.yaml", comments=comments)
        assert load_config(path) == cfg
        assert yaml.safe_load(cfg.to_yaml(comments=comments)) == config_to_dict(cfg)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_save_config_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "config.yaml"
    save_config(Config(), target)
    save_config(load_config(None, ["max_steps=3"]), target)  # replace an existing file
    assert load_config(target).max_steps == 3
    assert os.listdir(target.parent) == ["config.yaml"]


def test_yaml_file_sections_and_dotted_keys(tmp_path):
    path = _write(
        tmp_path,
        "max_steps: 20\noptim:\n  lr: 1e-3\n  batch_size: 2\nregime.name: mixed\nlog:\n",
    )
    cfg = load_config(path)
    assert cfg.max_steps == 20
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.batch_size == 2
    assert cfg.regime.name == "mixed"
    assert cfg.log == Config().log  # an empty section keeps the defaults


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_empty_file_is_an_error_that_says_so(tmp_path, text):
    # An empty file is more likely a mistake (a failed copy, the wrong file) than a request for the
    # defaults, which `{}` or no file at all give.
    path = _write(tmp_path, text)
    with pytest.raises(HPDError, match=rf"config file '{re.escape(str(path))}' is empty \(no settings\)"):
        load_config(path)
    assert load_config(_write(tmp_path, "{}\n")) == Config()


def test_yaml_booleans_for_word_choices_map_back(tmp_path):
    # YAML 1.1 reads unquoted off/no as False: those must still mean the words.
    cfg = load_config(_write(tmp_path, "log:\n  tensorboard: off\noptim:\n  mixed_precision: no\n"))
    assert cfg.log.tensorboard == "off" and cfg.optim.mixed_precision == "no"


# ---------------------------------------------------------------- overrides


def test_overrides_dotted_and_top_level_win_over_the_file(tmp_path):
    path = _write(tmp_path, "max_steps: 5\noptim:\n  lr: 0.5\n")
    cfg = load_config(path, ["optim.lr=3e-4", "max_steps=20", "seed=3"])
    assert cfg.optim.lr == 3e-4 and cfg.max_steps == 20 and cfg.seed == 3


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("optim.lr=1", "optim.lr", 1.0),  # int accepted for a float, stored as float
        ("optim.lr='2e-3'", "optim.lr", 2e-3),
        ("optim.weight_decay=1e-2", "optim.weight_decay", 0.01),
        ("max_steps=1e3", "max_steps", 1000),  # integral exponent notation
        ("max_steps=30.0", "max_steps", 30),
        ("log.progress=false", "log.progress", False),
        ("log.progress=yes", "log.progress", True),
        ("student.trust_remote_code=true", "student.trust_remote_code", True),
        ("data.eval=null", "data.eval", None),
        ("data.eval=none", "data.eval", None),
        ("data.eval=None", "data.eval", None),
        ("data.eval=", "data.eval", None),
        ("student.init_seed=null", "student.init_seed", None),
        ("student.init_seed=5", "student.init_seed", 5),
        ("regime.teacher_cache=/tmp/cache", "regime.teacher_cache", "/tmp/cache"),
        ("data.train=a=b.jsonl", "data.train", "a=b.jsonl"),  # split on the first '=' only
        ("resume=never", "resume", "never"),
    ],
)
def test_override_values_are_converted_to_the_field_type(override, key, expected):
    cfg = load_config(None, [override])
    section, _, leaf = key.rpartition(".")
    value = getattr(getattr(cfg, section) if section else cfg, leaf)
    assert value == expected and type(value) is type(expected)


def test_none_word_is_a_value_for_non_optional_teacher_path():
    cfg = load_config(None, ["teacher.path=none", "objective.name=sft"])
    assert cfg.teacher.path == "none"


# ---------------------------------------------------------------- errors name the key


def _error(overrides=(), text=None, tmp_path=None) -> str:
    path = _write(tmp_path, text) if text is not None else None
    with pytest.raises(HPDError) as info:
        load_config(path, list(overrides))
    return str(info.value)


def test_unknown_key_suggests_the_closest_valid_key():
    msg = _error(["optim.lrr=1"])
    assert "'optim.lrr'" in msg and "did you mean 'optim.lr'" in msg


def test_unknown_key_in_file_names_file_and_suggestion(tmp_path):
    msg = _error(text="optim:\n  batchsize: 4\n", tmp_path=tmp_path)
    assert "'optim.batchsize'" in msg and "'optim.batch_size'" in msg and "cfg.yaml" in msg


def test_right_key_in_the_wrong_section_is_suggested(tmp_path):
    msg = _error(text="lr: 0.1\n", tmp_path=tmp_path)
    assert "'lr'" in msg and "did you mean 'optim.lr'" in msg


def test_unknown_section_and_too_deep_keys_are_rejected(tmp_path):
    assert "'optimizer.lr'" in _error(["optimizer.lr=1"])
    assert "'optim.lr.x'" in _error(["optim.lr.x=1"])
    assert "unknown config key 'foo'" in _error(text="foo:\n  bar: 1\n", tmp_path=tmp_path)


def test_wrong_type_message_names_key_and_value():
    assert _error(["optim.lr=abc"]) == "optim.lr: expected a float, got 'abc'"
    assert "max_steps: expected an int, got 2.5" in _error(["max_steps=2.5"])
    assert "log.progress: expected a bool" in _error(["log.progress=maybe"])
    assert "student.init_seed: expected an int or null, got 'x'" in _error(["student.init_seed=x"])
    assert "optim.batch_size: expected an int, got True" in _error(["optim.batch_size=true"])
    assert "optim.lr: expected a float, got None" in _error(["optim.lr=null"])
    assert "optim.lr: expected a finite float" in _error(["optim.lr=.nan"])


def test_wrong_type_in_yaml_file(tmp_path):
    msg = _error(text="optim:\n  lr: [1, 2]\n", tmp_path=tmp_path)
    assert msg.startswith("optim.lr: expected a float")


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("optim.lr=0", ["optim.lr", "> 0", "got 0.0"]),
        ("max_steps=0", ["max_steps", ">= 1", "got 0"]),
        ("data.eval_fraction=0.6", ["data.eval_fraction", "[0, 0.5]", "got 0.6"]),
        ("objective.alpha=1", ["objective.alpha", "[0, 1)", "got 1.0"]),
        ("objective.mu=0", ["objective.mu", "(0, 1]", "got 0.0"]),
        ("regime.top_p=1.5", ["regime.top_p", "(0, 1]", "got 1.5"]),
        ("data.max_length=4", ["data.max_length", ">= 8", "got 4"]),
        ("regime.temperature=-1", ["regime.temperature", ">= 0"]),
    ],
)
def test_out_of_range_message_names_key_range_and_value(override, fragments):
    msg = _error([override])
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_bad_choice_lists_choices_and_suggests():
    msg = _error(["objective.name=hdp"])
    assert msg.startswith("objective.name: must be one of sft|fkl|")
    assert "got 'hdp'" in msg and "did you mean 'hpd'" in msg
    assert "regime.name" in _error(["regime.name=online"])


def test_boundary_values_are_accepted():
    cfg = load_config(
        None,
        [
            "objective.beta=0",
            "objective.beta=1",
            "objective.mu=1",
            "objective.alpha=0",
            "data.eval_fraction=0.5",
            "regime.temperature=0",
            "objective.chunk_size=0",
            "optim.max_grad_norm=0",
        ],
    )
    assert cfg.objective.beta == 1.0 and cfg.data.eval_fraction == 0.5


def test_cross_field_rules():
    assert "teacher.path" in _error(["teacher.path=none"])  # hpd needs a teacher
    assert "regime" in _error(["teacher.path=none", "objective.name=sft", "regime.name=teacher"])
    assert "student.tiny_hidden (64) must be divisible by student.tiny_heads (5)" in _error(
        ["student.tiny_heads=5"]
    )
    assert "data.eval_fraction" in _error(["data.eval=e.jsonl", "data.eval_fraction=0.1"])


def test_several_problems_are_reported_together():
    msg = _error(["optim.lr=-1", "max_steps=0"])
    assert "2 config problems" in msg and "optim.lr" in msg and "max_steps" in msg


def test_malformed_override_and_file_errors(tmp_path):
    assert "key=value" in _error(["optim.lr"])
    assert "is a section" in _error(["optim=3"])
    with pytest.raises(HPDError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    assert "not valid YAML" in _error(text="optim: [\n", tmp_path=tmp_path)
    assert "must be a mapping" in _error(text="- 1\n- 2\n", tmp_path=tmp_path)
    assert "optim: expected a mapping" in _error(text="optim: 3\n", tmp_path=tmp_path)


def test_validate_catches_values_set_from_python():
    cfg = Config()
    cfg.optim.lr = "fast"
    with pytest.raises(HPDError, match="optim.lr: expected a float"):
        validate(cfg)
    cfg = Config()
    cfg.regime.mixed_lambda = 2.0
    with pytest.raises(HPDError, match=r"regime.mixed_lambda: must be \[0, 1\], got 2.0"):
        cfg.validate()


def test_every_field_has_help_and_well_formed_checks():
    for key, f, _tp, value in iter_fields():
        assert f.metadata.get("help"), key
        if "choices" in f.metadata:  # a list field: each of its items
            assert all(v in f.metadata["choices"] for v in (value if isinstance(value, list) else [value])), key
    meta = {key: f.metadata for key, f, _tp, _v in iter_fields()}
    assert set(meta["objective.name"]["choices"]) == set(OBJECTIVE_NAMES)


# ---------------------------------------------------------------- help


def test_config_help_mentions_every_field_with_default_and_checks():
    text = config_help()
    keys = [key for key, *_ in iter_fields()]
    assert len(keys) == len(set(keys)) > 50
    for key, f, _tp, value in iter_fields():
        line = next((ln for ln in text.splitlines() if ln.startswith(f"  {key}  (")), None)
        assert line is not None, key
        assert "default" in line, key
    assert "optim.lr  (float, default 0.001; > 0)" in text
    assert "objective.name  (str, default hpd; one of sft|" in text
    assert "student.init_seed  (int | None, default null)" in text


def test_sections_are_flat():
    for f in dataclasses.fields(Config):
        section = getattr(Config(), f.name)
        if dataclasses.is_dataclass(section):
            for sf in dataclasses.fields(section):
                assert not dataclasses.is_dataclass(getattr(section, sf.name)), (f.name, sf.name)


def test_report_to_is_a_checked_list_from_yaml_or_override(tmp_path):
    assert load_config(None).log.report_to == []
    assert load_config(None, ["log.report_to=wandb,mlflow"]).log.report_to == ["wandb", "mlflow"]
    assert load_config(None, ["log.report_to=[tensorboard]"]).log.report_to == ["tensorboard"]
    cfg = load_config(_write(tmp_path, "log:\n  report_to: [mlflow, tensorboard]\n"))
    assert cfg.log.report_to == ["mlflow", "tensorboard"]
    # the saved config reads back the same (resume compares it)
    assert load_config(_write(tmp_path, cfg.to_yaml())).log.report_to == ["mlflow", "tensorboard"]
    assert Config().log.report_to is not Config().log.report_to  # no shared mutable default
    with pytest.raises(HPDError, match=r"log.report_to: must be one of tensorboard\|wandb\|mlflow\|none, got 'comet'"):
        load_config(None, ["log.report_to=wandb,comet"])
    with pytest.raises(HPDError, match="'none' alone"):
        load_config(None, ["log.report_to=none,wandb"])
    with pytest.raises(HPDError, match="log.tensorboard is off"):
        load_config(None, ["log.report_to=tensorboard", "log.tensorboard=off"])
    with pytest.raises(HPDError, match="log.report_to: expected a list"):
        load_config(_write(tmp_path, "log:\n  report_to: 3\n"))


def test_save_dtype_is_checked():
    assert load_config(None).save.dtype == "fp32"
    assert load_config(None, ["save.dtype=bf16"]).save.dtype == "bf16"
    with pytest.raises(HPDError, match=r"save.dtype: must be one of fp32\|bf16\|fp16, got 'int8'"):
        load_config(None, ["save.dtype=int8"])


# --------------------------------------------------------------------------------------------
# Hugging Face names (aliases)
# --------------------------------------------------------------------------------------------


def test_hf_names_set_their_keys_in_overrides_and_files(tmp_path):
    cfg = load_config(None, ["learning_rate=3e-4", "optim.per_device_train_batch_size=4",
                             "gradient_accumulation_steps=2", "gradient_checkpointing=true"])
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.optim.grad_accum, cfg.student.gradient_checkpointing) == (
        3e-4, 4, 2, True)
    path = _write(tmp_path, "learning_rate: 2.0e-4\noptim:\n  lr_scheduler_type: linear\n  gradient_accumulation_steps: 3\n"
                            "save_total_limit: 5\n")
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.schedule, cfg.optim.grad_accum, cfg.save.keep_last) == (2e-4, "linear", 3, 5)
    # The canonical config written back names the keys, not the aliases.
    assert "learning_rate" not in cfg.to_yaml() and "lr: 0.0002" in cfg.to_yaml()
    # A value out of range is reported under the key it sets.
    assert "optim.lr: must be > 0" in _error(["learning_rate=0"])


def test_an_alias_and_its_key_set_to_different_values_is_an_error(tmp_path):
    msg = _error(["learning_rate=1e-3", "optim.lr=2e-3"])
    assert "'learning_rate'" in msg and "'optim.lr'" in msg and "keep one of them" in msg
    msg = _error(text="optim:\n  lr: 0.001\n  learning_rate: 0.002\n", tmp_path=tmp_path)
    assert "both set 'optim.lr'" in msg and "cfg.yaml" in msg
    # The same value twice is no conflict; an override replaces what the file said under any name.
    assert load_config(None, ["learning_rate=1e-3", "optim.lr=0.001"]).optim.lr == 1e-3
    assert load_config(_write(tmp_path, "optim:\n  lr: 0.001\n"), ["learning_rate=5e-4"]).optim.lr == 5e-4


def test_a_misspelt_hf_name_suggests_the_key_it_stands_for():
    assert "did you mean 'optim.lr'" in _error(["optim.learnig_rate=1"])
    assert "did you mean 'optim.lr'" in _error(["learning_rat=1"])
    assert "did you mean 'optim.grad_accum'" in _error(["gradient_accumulation_step=2"])


def test_num_train_epochs_sets_epochs_and_epochs_is_checked():
    assert load_config(None).epochs is None
    assert load_config(None, ["num_train_epochs=2.5"]).epochs == 2.5
    assert load_config(None, ["epochs=1"]).epochs == 1.0
    assert "epochs: must be > 0" in _error(["num_train_epochs=0"])
    assert "keep one of them" in _error(["num_train_epochs=2", "epochs=3"])


def test_every_alias_names_a_key_or_is_refused_naming_it():
    from hpd.configuration.keys import ALIASES

    keys = {key for key, *_ in iter_fields()}
    help_text = config_help()
    for alias, key in ALIASES.items():
        if key in keys:  # listed in the help, and accepted
            assert f"  {alias}  ->  {key}" in help_text
            default = dict((k, v) for k, _f, _t, v in iter_fields())[key]
            assert config_to_dict(config_from_dict({alias: default})) == config_to_dict(Config())
        else:  # e.g. report_to before log.report_to exists
            assert f"stands for '{key}'" in _error([f"{alias}=x"])
