"""A user's objective, defined outside the package, trained with by import path (`module:Class`)."""

from __future__ import annotations

import json
import textwrap

import pytest
from safetensors.torch import load_file

from hpd.config import config_help, load_config
from hpd.errors import HPDError
from hpd.models.loading import load_model, save_model
from hpd.training.setup import objective_from_config
from hpd.training.trainer import train

pytestmark = pytest.mark.usefixtures("single_torch_thread")

# Forward KL written from its definition, with a parameter of its own (no config field: its default).
USER_MODULE = textwrap.dedent('''
    import torch
    from hpd.objectives import Objective, Param, TokenWeights

    class MyForwardKL(Objective):
        name = "my_fkl"
        support = "vocab"
        summary = "forward KL written outside hpd"
        params = {"gain": Param(1.0, "a factor on the loss (1 = forward KL)", 0.0, low_open=True)}

        def weights(self, logq, teacher, labels, sample):
            logp = teacher.full(self.name)
            p = logp.exp()
            value = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)
            return TokenWeights(weights=self.gain * p, tokens=None, value=self.gain * value)

    class NotAnObjective:
        pass
''')
MODULE = "hpd_test_user_losses"
COMMON = ["data.max_length=48", "log.progress=false", "log.tensorboard=off", "log.every=1", "save.every=0",
          "log.eval_every=0", "max_steps=3", "optim.batch_size=4"]


@pytest.fixture()
def user_module(tmp_path, monkeypatch, repo_root):
    (tmp_path / f"{MODULE}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(repo_root)
    return f"{MODULE}:MyForwardKL"


def test_a_user_objective_trains_by_import_path_like_its_builtin_twin(user_module, tmp_path):
    model, tok = load_model("tiny", tiny={"num_layers": 2, "hidden_size": 64, "intermediate_size": 128}, seed=7)
    teacher = save_model(model, tok, tmp_path / "teacher")
    runs = {}
    for name in ("fkl", user_module):
        out = tmp_path / name.replace(":", "_")
        cfg = load_config("configs/tiny.yaml", [*COMMON, f"output_dir={out}", f"teacher.path={teacher}",
                                                f"objective.name={name}"])
        obj = objective_from_config(cfg)
        assert obj.name == ("fkl" if name == "fkl" else "my_fkl")
        runs[name] = train(cfg)
    losses = {n: [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                  if r["type"] == "train"] for n, d in runs.items()}
    assert len(losses["fkl"]) == 3 and losses[user_module] == losses["fkl"]
    a, b = (load_file(str(d / "final" / "model.safetensors")) for d in runs.values())
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (runs[user_module] / "config.yaml").read_text().count(f"name: {user_module}") == 1


def test_a_bad_import_path_is_a_one_line_config_error(user_module):
    for name, match in [(f"{MODULE}:Nope", "has no Objective subclass named 'Nope'"),
                        (f"{MODULE}:NotAnObjective", "has no Objective subclass"),
                        ("no_such_module_xyz:Loss", "cannot import module 'no_such_module_xyz'")]:
        with pytest.raises(HPDError, match=match) as e:
            load_config(None, [f"objective.name={name}"])
        assert "\n" not in str(e.value) and str(e.value).startswith("objective.name: ")
    with pytest.raises(HPDError, match="did you mean 'fkl'"):
        load_config(None, ["objective.name=fk"])


def test_the_config_help_lists_each_objective_parameter_once_from_its_declaration():
    from hpd.objectives import OBJECTIVES

    text = config_help()
    flat = "".join(text.split()).replace("-", "")  # the help is wrapped (at spaces or hyphens)
    assert "module:Class" in text
    for name, cls in OBJECTIVES.items():
        for pname, p in cls.params.items():
            assert text.count(f"objective.{p.field_name(pname)}  (") == 1, (name, pname)
            assert "".join(p.help.split()).replace("-", "") in flat, (name, pname)
