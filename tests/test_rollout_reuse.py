"""Rollout reuse under PPO-style clipping (regime.minibatches / epochs) and the rollout-bias guards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpd.config import load_config
from hpd.errors import HPDError
from hpd.objectives import RatioClip, RolloutWeights, get_objective, rollout_weights
from hpd.responses.regimes import rollout_bias
from hpd.training.trainer import Trainer, train

pytestmark = pytest.mark.usefixtures("single_torch_thread")

FAST = ["data.max_length=40", "regime.max_new_tokens=6", "log.progress=false", "log.tensorboard=off",
        "save.every=0", "optim.batch_size=4", "regime.name=student", "objective.name=hpd"]


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch, repo_root):
    monkeypatch.chdir(repo_root)


def config(out: Path, *overrides: str):
    return load_config("configs/tiny.yaml", [*FAST, f"output_dir={out}", *overrides])


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def train_records(run_dir: Path) -> list[dict]:
    from hpd.training.metrics_file import read_records

    return read_records(Path(run_dir) / "metrics.jsonl", "train")


# --------------------------------------------------------------------------------------------
# M = E = 1: the reuse route is the plain on-policy step, bit for bit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["hpd", "orkl"])
def test_reuse_route_with_one_minibatch_and_one_epoch_equals_the_plain_step_bitwise(objective, tmp_path):
    """The rollout-time weights + ratio clip at M = E = 1 (ratio exactly 1) give the weights of the
    plain step; a config with M = E = 1 takes the plain path itself (no extra forward)."""
    overrides = [f"objective.name={objective}", "max_steps=3", "optim.grad_accum=2"]
    plain = train(config(tmp_path / "plain", *overrides))

    forced = Trainer(config(tmp_path / "forced", *overrides))
    assert forced.reuse is None  # the default takes the plain path
    forced.reuse = (1, 1)  # the reuse machinery, with one mini-batch and one epoch
    forced.module.clip = RatioClip()
    forced.run()

    a, b = final_weights(plain), final_weights(tmp_path / "forced")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the reuse route at M = E = 1 changed the weights"
    ra, rb = train_records(plain), train_records(tmp_path / "forced")
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert [r["generated_tokens_total"] for r in ra] == [r["generated_tokens_total"] for r in rb]
    assert all(r["ratio_mean"] == 1.0 and r["clip_frac_high"] == 0.0 and r["approx_kl"] == 0.0 for r in rb)


# --------------------------------------------------------------------------------------------
# M > 1: the clipped loss is the PPO loss
# --------------------------------------------------------------------------------------------

CLIP = RatioClip(low=0.2, high=0.28, dual=3.0)
# Per active position: (advantage, target ratio) for y, then for y_hat. Every region of the PPO loss:
ENTRIES = [
    [(0.5, 1.1), (-0.3, 0.9)],    # both inside the clip range
    [(0.7, 1.5), (-0.4, 0.5)],    # positive above 1 + high (clipped high); negative below 1 - low (clipped low)
    [(-0.6, 4.0), (0.2, 0.5)],    # negative above the dual clip (capped); positive below 1 - low (not clipped)
    [(-0.2, 2.0), (0.0, 1.7)],    # negative between 1 + high and dual (not clipped); no weight
]


def _fixed_example(dtype=torch.float64):
    """Student logits (1, 5, 7), labels with one ignored position, and rollout weights whose ratios
    to the current student are the targets of ENTRIES."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 5, 7, generator=g, dtype=dtype)
    labels = torch.tensor([[1, 3, 0, 6, -100]])
    y_hat = torch.tensor([[2, 4, 5, 1, 0]])
    logq = torch.log_softmax(logits, -1)
    tokens = torch.stack([labels.clamp_min(0), y_hat], -1)  # (1, 5, 2)
    weights = torch.zeros(1, 5, 2, dtype=dtype)
    old = torch.zeros(1, 5, 2, dtype=dtype)
    for t, pair in enumerate(ENTRIES):
        for k, (a, rho) in enumerate(pair):
            weights[0, t, k] = a
            old[0, t, k] = logq[0, t, tokens[0, t, k]] - torch.log(torch.tensor(rho, dtype=dtype))
    return logits, labels, RolloutWeights(weights, tokens, old)


def _hand_ppo(logits: torch.Tensor, rw: RolloutWeights, clip: RatioClip, n: int) -> torch.Tensor:
    """The PPO loss with dual clip, written out: (1/N) sum over weighted tokens of
    max(-A rho, -A clip(rho)), and for A < 0 at most -A c."""
    logq = torch.log_softmax(logits, -1).gather(2, rw.tokens)
    rho = torch.exp(logq - rw.old_logp)
    A = rw.weights
    l1, l2 = -A * rho, -A * rho.clamp(1 - clip.low, 1 + clip.high)
    loss = torch.maximum(l1, l2)
    if clip.dual:
        loss = torch.where(A < 0, torch.minimum(loss, -A * clip.dual), loss)
    return loss[:, :4].sum() / n


@pytest.mark.parametrize("dual", [3.0, 0.0])
@pytest.mark.parametrize("chunked", [False, True])
def test_clipped_loss_and_gradient_equal_the_hand_computed_ppo_loss(dual, chunked):
    clip = RatioClip(0.2, 0.28, dual)
    logits, labels, rw = _fixed_example()
    obj = get_objective("hpd")
    z = logits.clone().requires_grad_(True)
    if chunked:  # logits = hidden @ W.T with W = I: the chunked path on the same logits
        out = obj.chunked(z, torch.eye(7, dtype=z.dtype), None, labels, chunk_size=2, rollout=rw, clip=clip)
    else:
        out = obj(z, None, labels, rollout=rw, clip=clip)
    out.loss.backward()

    zh = logits.clone().requires_grad_(True)
    hand = _hand_ppo(zh, rw, clip, n=4)
    hand.backward()
    assert float(out.value) == pytest.approx(float(hand.detach()), abs=1e-12)  # the logged value is the PPO loss
    torch.testing.assert_close(z.grad, zh.grad, rtol=0, atol=1e-12)

    m = out.metrics
    weighted = 7  # entries with a nonzero advantage
    assert m["clip_frac_high"] == pytest.approx(1 / weighted)
    assert m["clip_frac_low"] == pytest.approx(1 / weighted)
    assert m["clip_frac_dual"] == pytest.approx((1 if dual else 0) / weighted)
    rho_y = torch.tensor([1.1, 1.5, 4.0, 2.0], dtype=torch.float64)
    assert m["approx_kl"] == pytest.approx(float(((rho_y - 1) - rho_y.log()).mean()))
    assert m["ratio_max"] == pytest.approx(4.0)


def test_clipped_tokens_get_no_gradient_and_dual_clip_off_keeps_it():
    """The gradient at a clipped token is zero; without the dual clip the capped token trains."""
    logits, labels, rw = _fixed_example()
    obj = get_objective("hpd")
    grads = {}
    for dual in (3.0, 0.0):
        z = logits.clone().requires_grad_(True)
        obj(z, None, labels, rollout=rw, clip=RatioClip(0.2, 0.28, dual)).loss.backward()
        grads[dual] = z.grad
    # Position 1: both of its tokens are clipped, so nothing reaches its logits.
    assert torch.all(grads[3.0][0, 1] == 0)
    # Position 2, token y (A = -0.6, ratio 4): capped with the dual clip, trained without it.
    assert torch.all(grads[3.0][0, 2] != grads[0.0][0, 2])
    assert torch.all(grads[3.0][0, 4] == 0)  # the ignored position


def test_rollout_weights_are_the_objective_weights_with_their_log_probabilities():
    """At rollout time the fixed weights are the objective's own (HPD's y_hat drawn as the plain
    step draws it), and their PPO loss at the same policy has the plain surrogate's gradient."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 8, generator=g)
    W = torch.randn(11, 8, generator=g)
    teacher = torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :2] = -100
    obj = get_objective("hpd")
    rw, _ = rollout_weights(obj, hidden, W, teacher, labels, chunk_size=4, generator=torch.Generator().manual_seed(5))
    assert rw.weights.shape == rw.tokens.shape == rw.old_logp.shape == (2, 6, 2)
    assert torch.all(rw.weights[0, :2] == 0)
    logq = torch.log_softmax(hidden @ W.T, -1)
    torch.testing.assert_close(rw.old_logp, logq.gather(2, rw.tokens).masked_fill(labels[..., None] < 0, 0.0))
    assert torch.equal(rw.tokens[..., 0].masked_fill(labels < 0, -100), labels)

    h1 = hidden.clone().requires_grad_(True)
    obj.chunked(h1, W, teacher, labels, chunk_size=4, sampled_tokens=rw.tokens[..., 1].masked_fill(labels < 0, -100)).loss.backward()
    h2 = hidden.clone().requires_grad_(True)
    obj.chunked(h2, W, None, labels, chunk_size=4, rollout=rw, clip=RatioClip()).loss.backward()
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-6, atol=1e-7)


def test_reuse_of_a_vocabulary_objective_is_refused():
    with pytest.raises(HPDError, match="weighs the whole vocabulary"):
        rollout_weights(get_objective("rkl"), torch.zeros(1, 2, 4), torch.zeros(5, 4), torch.zeros(1, 2, 5),
                        torch.zeros(1, 2, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# The trainer: reuse counts, logging, and resume mid-way through a rollout batch
# --------------------------------------------------------------------------------------------


def test_one_rollout_batch_feeds_minibatches_times_epochs_steps(tmp_path):
    run = train(config(tmp_path / "run", "max_steps=8", "regime.minibatches=2", "regime.epochs=2"))
    recs = train_records(run)
    generated = [r["generated_tokens_total"] for r in recs]
    # New rollouts at steps 1 and 5 only (a batch of 2 x 4 prompts feeds 4 steps).
    assert generated[0] > 0 and generated[0] == generated[3] < generated[4] == generated[7]
    assert [(r["reuse_epoch"], r["reuse_minibatch"]) for r in recs[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert "rollout_frac_A" in recs[0] and "rollout_frac_A" not in recs[1]
    assert recs[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # the policy that rolled out
    assert recs[2]["approx_kl"] > 0  # the second epoch trains a policy that has moved
    for key in ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "ratio_max"):
        assert key in recs[2]


def test_resume_inside_a_rollout_batch_equals_an_uninterrupted_run(tmp_path):
    common = ["max_steps=6", "regime.minibatches=2", "regime.epochs=2", "save.every=3", "save.keep_last=5"]
    reference = train(config(tmp_path / "reference", *common))
    ckpt = reference / "checkpoints" / "step-00000003"  # step 3 of a 4-step rollout batch
    assert (ckpt / "rollouts-rank0.json").is_file()
    assert not (reference / "checkpoints" / "step-00000004").exists()

    resumed = train(config(tmp_path / "resumed", *common, f"resume={ckpt}"))
    a, b = final_weights(reference), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "resuming mid-way through a rollout batch changed the run"
    ref_losses = [r["loss"] for r in train_records(reference)][3:]
    assert [r["loss"] for r in train_records(resumed)] == ref_losses


def test_resume_inside_a_rollout_batch_it_does_not_hold_is_refused(tmp_path):
    """A resume whose reuse settings put the checkpoint's step inside another rollout batch than the
    one saved (or inside one where none was saved) cannot rebuild it: refused, not resampled."""
    common = ["max_steps=5", "regime.minibatches=2", "regime.epochs=2", "save.every=1", "save.keep_last=5"]
    run = train(config(tmp_path / "run", *common))
    for step, reuse in ((4, ["regime.minibatches=3"]), (3, ["regime.epochs=3"])):
        ckpt = run / "checkpoints" / f"step-{step:08d}"
        with pytest.raises(HPDError, match="rollout batch"):
            train(config(tmp_path / f"other{step}", *common, *reuse, f"resume={ckpt}", "resume_allow_changes=true"))


@pytest.mark.parametrize("overrides, match", [
    (["regime.name=dataset"], "regime.name='dataset' has none"),
    (["regime.name=mixed"], "mixed draws its regime per step"),
    (["objective.name=rkl"], "weighs the whole vocabulary"),
    (["regime.dual_clip=0.5"], "regime.dual_clip must be > 1"),
])
def test_reuse_config_errors(overrides, match, tmp_path):
    with pytest.raises(HPDError, match=match):
        config(tmp_path, "regime.minibatches=2", *overrides)


# --------------------------------------------------------------------------------------------
# Guards: rollouts that are not samples of the loss distribution
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, setting", [
    (["regime.temperature=0.7"], "regime.temperature=0.7"),
    (["regime.temperature=0"], "regime.temperature=0"),
    (["objective.temperature=2"], "objective.temperature=2"),
    (["regime.top_p=0.9"], "regime.top_p=0.9"),
    (["regime.top_k=5"], "regime.top_k=5"),
    (["student.lora_rank=2", "student.lora_dropout=0.1"], "lora_dropout"),
])
def test_biased_rollouts_are_refused_for_sampled_objectives(overrides, setting, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(HPDError, match="allow_biased_rollouts") as e:
        Trainer(config(out, *overrides))
    assert setting in str(e.value)
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("overrides", [
    ["objective.name=hpd", "regime.top_p=0.9", "regime.allow_biased_rollouts=true"],  # opted out
    ["objective.name=rkl", "regime.temperature=0.7"],  # exact at every prefix: a warning only
    ["objective.name=orkl", "regime.name=mixed", "regime.top_k=3", "regime.allow_biased_rollouts=true"],
])
def test_biased_rollouts_warn_when_allowed(overrides, tmp_path, capsys):
    t = Trainer(config(tmp_path / "run", *overrides))
    t.close()
    assert "warning: the rollouts are not samples of the loss distribution" in capsys.readouterr().out


def test_no_guard_without_rollouts_or_with_unbiased_ones(tmp_path):
    from hpd.models.loading import load_model

    model, _ = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32})
    assert rollout_bias(config(tmp_path, "regime.name=dataset", "regime.top_p=0.5"), model) == []
    assert rollout_bias(config(tmp_path, "regime.name=mixed", "regime.mixed_lambda=0", "regime.top_k=4"), model) == []
    assert rollout_bias(config(tmp_path), model) == []
    model.config.attention_dropout = 0.1  # applied inside the attention kernel, not by a module
    causes = rollout_bias(config(tmp_path), model)
    assert len(causes) == 1 and "config.attention_dropout=0.1" in causes[0]
