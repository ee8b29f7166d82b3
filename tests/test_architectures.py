"""Every causal-LM architecture transformers can build: hpd's hidden-state views give its logits.

The memory-lean paths never call the model's forward for logits: they take its final hidden
states and apply `hpd.models.head.lm_head_of(model)` (weight, bias and the model's logit transform:
Gemma 2's softcap, Granite's `logits_scaling`, Cohere's `logit_scale`, ...). For each model type of
transformers' `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, a tiny random model (seed 0, 2 layers, width
32, the byte tokenizer's 264 rows, head weights scaled up so a softcap bites) is built offline
from its config class, and either `lm_head_of` refuses it by name (`REFUSED`), or these equal
`model(...).logits` to 1e-5 in float32:

- the student's view (`lm_head_of(model).logits(final_hidden_states(...))`) and its chunked loss
  (against the reference loss on the model's logits);
- the online teacher's view (`hpd.teachers.sources.teacher_view`, a `HeadTeacher`);
- the Trainer integrations' view (the LM head's input captured by `_CaptureHidden`);
- the teacher cache (built from the saved model, or refused by name): by default for the
  transform-bearing architectures and llama, for every buildable one in the slow sweep
  (`make test-slow`; 142 types, about 70 s on two shared cores).

Gradients of the chunked loss equal autograd's through `model(...).logits` for gemma2, granite and
cohere. `SKIPPED` lists the model types that cannot be built tiny from a generic config offline,
with the reason; a model type in neither list that fails to build fails the test, so a new
transformers release cannot add an unchecked architecture silently.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, CONFIG_MAPPING  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

from hpd.errors import HPDError  # noqa: E402
from hpd.models.head import _LOGIT_TRANSFORMS, final_hidden_states, lm_head_of  # noqa: E402
from hpd.objectives import get_objective  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_torch_thread")

VOCAB = 264  # the byte tokenizer's rows, so a saved model has a usable tokenizer
BASIC = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=64, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
SMALL = dict(BASIC,
             # mixtures of experts: few and small
             num_experts=4, num_local_experts=4, n_routed_experts=4, moe_intermediate_size=32, num_experts_per_tok=2,
             n_shared_experts=1, shared_expert_intermediate_size=32, first_k_dense_replace=1,
             # rotary and latent-attention widths within head_dim
             rotary_dim=8, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, kv_lora_rank=16, q_lora_rank=16)
# Transform fields set away from their neutral values, so that skipping them shows.
TRANSFORMS = dict(final_logit_softcapping=3.0, logits_soft_cap=3.0, output_logit_soft_cap=3.0, logit_scale=0.25,
                  logits_scaling=4.0, lm_head_multiplier=3.0)
HEAD_GAIN = 40.0  # random heads give logits ~0.1, where a softcap is nearly the identity

# Model types refused by `lm_head_of`, by design (their logits are no transform of h @ W.T + b).
REFUSED = {
    "bert", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert", "modernbert-decoder",
    "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta", "xlm-roberta-xl", "xmod",
    "dory", "inkling_text", "gemma4_assistant", "gemma4_unified_assistant", "clvp", "git", "prophetnet", "minicpm3",
    # refused conservatively: the output embedding sits inside another module (here a plain one)
    "bert-generation", "xlm",
}
TRANSFORMED = {"gemma2": "softcap", "granite": "scale", "cohere": "scale"}  # the gradient checks

# Model types not built here, and why: what building each from SMALL (and one forward) gave with
# transformers 5.25. Most are multimodal or mixture models whose sub-configs keep full sizes, or
# configs whose validators want architecture-specific sizes.
SKIPPED: dict[str, str] = {
    "axk1": "its forward fails on the generic tiny config: The size of tensor a (4) must match the size of tensor b (8) at non-singleton dimension 3",
    "bailing_hybrid": "its forward fails on the generic tiny config: shape '[-1, 8, 0]' is invalid for input of size 56",
    "bamba": "its config rejects the generic tiny sizes: ValueError: mamba_n_heads must divide mamba_expand * hidden_size",
    "bart": "3M parameters even from the tiny config (vision/audio towers or many experts)",
    "bigbird_pegasus": "4M parameters even from the tiny config (vision/audio towers or many experts)",
    "blenderbot": "16M parameters even from the tiny config (vision/audio towers or many experts)",
    "blt": "4633M parameters even from the tiny config (vision/audio towers or many experts)",
    "cohere_compass_text": "its config rejects the generic tiny sizes: KeyError: 'full_attention'",
    "dbrx": "its config rejects the generic tiny sizes: AttributeError: 'DbrxAttentionConfig' object has no attribute 'rope_theta'",
    "deepseek_v3": "its forward fails on the generic tiny config: The size of tensor a (4) must match the size of tensor b (8) at non-singleton dimension 3",
    "deepseek_v32": "its forward fails on the generic tiny config: shape '[-1, 8, 0]' is invalid for input of size 56",
    "dots3_note": "its config rejects the generic tiny sizes: ValueError: vision adapter output width must match the text hidden size",
    "emu3": "8492M parameters even from the tiny config (vision/audio towers or many experts)",
    "falcon": "its config rejects the generic tiny sizes: AttributeError: property 'head_dim' of 'FalconConfig' object has no setter",
    "gemma3": "2723M parameters even from the tiny config (vision/audio towers or many experts)",
    "gemma3n": "its config rejects the generic tiny sizes: ImportError:  TimmWrapperModel requires the timm library but it was not found in your environment. Y",
    "gemma3n_text": "its config rejects the generic tiny sizes: ValueError: The set of layer types producing a cache is different than the set of layer types using",
    "gemma4": "5077M parameters even from the tiny config (vision/audio towers or many experts)",
    "gemma4_assistant": "its config rejects the generic tiny sizes: ValueError: hidden_size_per_layer_input must be 0, got 256",
    "gemma4_text": "134M parameters even from the tiny config (vision/audio towers or many experts)",
    "gemma4_unified": "3011M parameters even from the tiny config (vision/audio towers or many experts)",
    "gemma4_unified_assistant": "2872M parameters even from the tiny config (vision/audio towers or many experts)",
    "git": "86M parameters even from the tiny config (vision/audio towers or many experts)",
    "got_ocr2": "561M parameters even from the tiny config (vision/audio towers or many experts)",
    "gpt_neo": "its config rejects the generic tiny sizes: ValueError: Configuration for convolutional module is incorrect. It is requir",
    "granitemoehybrid": "its config rejects the generic tiny sizes: ValueError: mamba_n_heads must divide mamba_expand * hidden_size",
    "inkling2_loop_text": "7M parameters even from the tiny config (vision/audio towers or many experts)",
    "inkling2_text": "8M parameters even from the tiny config (vision/audio towers or many experts)",
    "kimi_linear": "3M parameters even from the tiny config (vision/audio towers or many experts)",
    "kolibri1_1": "its config rejects the generic tiny sizes: ValueError: `index_num_heads` must be between 1 and the number of query he",
    "lfm2_moe": "its config rejects the generic tiny sizes: TypeError: 'NoneType' object is not subscriptable",
    "llama4": "107770M parameters even from the tiny config (vision/audio towers or many experts)",
    "longcat_flash": "its forward fails on the generic tiny config: The size of tensor a (4) must match the size of tensor b (8) at non-singleton dimension 3",
    "mamba2": "its config rejects the generic tiny sizes: ValueError: Inconsistent configuration: hidden_size * expand (64) must equal n",
    "marian": "3M parameters even from the tiny config (vision/audio towers or many experts)",
    "mbart": "3M parameters even from the tiny config (vision/audio towers or many experts)",
    "mimo_v2_flash": "its forward fails on the generic tiny config: The size of tensor a (2) must match the size of tensor b (0) at non-singleton dimension 1",
    "mllama": "9775M parameters even from the tiny config (vision/audio towers or many experts)",
    "moss_transcribe_diarize": "909M parameters even from the tiny config (vision/audio towers or many experts)",
    "musicgen": "its config rejects the generic tiny sizes: AttributeError: 'MusicgenConfig' object has no attribute 'dropout'",
    "musicgen_melody": "its config rejects the generic tiny sizes: AttributeError: 'MusicgenMelodyConfig' object has no attribute 'dropout'",
    "mvp": "3M parameters even from the tiny config (vision/audio towers or many experts)",
    "pegasus": "3M parameters even from the tiny config (vision/audio towers or many experts)",
    "phi4_multimodal": "870M parameters even from the tiny config (vision/audio towers or many experts)",
    "plbart": "its config rejects the generic tiny sizes: ValueError: embed_dim must be divisible by num_heads (got `embed_dim`: 32 and `num_heads`: 12).",
    "prophetnet": "its config rejects the generic tiny sizes: NotImplementedError: This model does not support the setting of `num_hidden_layers`. Please set `num",
    "qwen3_5": "8954M parameters even from the tiny config (vision/audio towers or many experts)",
    "qwen3_5_moe": "34661M parameters even from the tiny config (vision/audio towers or many experts)",
    "qwen4_exp": "its config rejects the generic tiny sizes: TypeError: unsupported operand type(s) for //: 'NoneType' and 'NoneType'",
    "reformer": "its config rejects the generic tiny sizes: AssertionError: If you want to use `ReformerModelWithLMHead` make sure that `is_decoder=True`.",
    "roc_bert": "13M parameters even from the tiny config (vision/audio towers or many experts)",
    "whisper": "its config rejects the generic tiny sizes: ValueError: embed_dim must be divisible by num_heads (got `embed_dim`: 32 and `num_heads`: 6).",
    "xlnet": "its config rejects the generic tiny sizes: NotImplementedError: The model xlnet is one of the few models that has no sequence length limit.",
    "xmod": "its forward needs a default language set (XmodPreTrainedModel.set_default_language)",
    "youtu": "its forward fails on the generic tiny config: The size of tensor a (4) must match the size of tensor b (8) at non-singleton dimension 3",
    "zamba": "its config rejects the generic tiny sizes: ValueError: `num_hidden_layers` (2) must be equal to the number of `layer_types`",
    "zamba2": "its config rejects the generic tiny sizes: ValueError: `num_hidden_layers` (2) must be equal to the number of `layer_types`",
    "zaya": "its config rejects the generic tiny sizes: ValueError: ZAYA currently supports `num_experts_per_tok=1` only.",
}


def _tiny(model_type: str):
    """The tiny random model of `model_type`, or raise."""
    cls = CONFIG_MAPPING[model_type]
    defaults = cls()
    extra = {}
    if model_type in _LOGIT_TRANSFORMS:  # (elsewhere such a field is refused as unknown: tested below)
        extra = {k: v for k, v in TRANSFORMS.items() if hasattr(defaults.get_text_config(), k)}
    try:
        config = cls(**SMALL, **extra)
    except Exception:  # noqa: BLE001 - a config that rejects the optional sizes gets the basic ones
        config = cls(**BASIC, **extra)
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if n > 3_000_000:
        raise RuntimeError(f"{n} parameters from the tiny config")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear):
        with torch.no_grad():
            head.weight.mul_(HEAD_GAIN)
    ids, mask = _batch()
    with torch.no_grad():  # the reference; a model whose own forward fails is not buildable here
        model.reference = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    return model


_BUILT: dict[str, object] = {}


def built(model_type: str):
    """The model (built once per session) or the exception building it raised."""
    if model_type not in _BUILT:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                _BUILT[model_type] = _tiny(model_type)
            except Exception as e:  # noqa: BLE001 - any failure to build is a skip reason or a test failure
                _BUILT[model_type] = e
    return _BUILT[model_type]


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB - 8, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as batches of prompts have
    return ids, mask


def _labels(ids, mask):
    labels = ids.roll(-1, 1).masked_fill(mask == 0, -100)
    labels[:, -1] = -100
    labels[:, :2] = -100  # a prompt
    return labels


TYPES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@pytest.mark.parametrize("model_type", TYPES)
def test_every_hidden_state_view_gives_the_models_logits(model_type):
    """Refused by name, or every view equals the model's own logits."""
    if model_type in SKIPPED:
        pytest.skip(SKIPPED[model_type])
    model = built(model_type)
    if isinstance(model, Exception):
        pytest.fail(f"{model_type} did not build tiny and is not in SKIPPED: {type(model).__name__}: {model}")
    if model_type in REFUSED:
        with pytest.raises(HPDError, match=model_type):
            lm_head_of(model)
        return
    ids, mask = _batch()
    ref = model.reference
    with torch.no_grad():
        head = lm_head_of(model)
        hidden = final_hidden_states(model, ids, mask)
        student_view = head.logits(hidden).float()
    assert (student_view - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max())
    # The student's chunked loss equals the reference loss on the model's logits.
    labels = _labels(ids, mask)
    teacher = ref.detach() * 0.5
    obj = get_objective("fkl")
    with torch.no_grad():
        a = obj(ref, teacher, labels).loss
        b = obj.chunked(hidden, head, teacher, labels, chunk_size=3).loss
    assert float(b) == pytest.approx(float(a), rel=1e-5, abs=1e-6)
    # The online teacher's view.
    from hpd.teachers.sources import teacher_view

    view = teacher_view(model, ids, mask, chunked=True)
    pos = (labels.reshape(-1) != -100).nonzero().squeeze(1)
    logp = view.chunker(VOCAB, 1.0)(pos, labels.reshape(-1)[pos]).logp
    torch.testing.assert_close(logp, torch.log_softmax(ref.reshape(-1, VOCAB)[pos], -1), atol=1e-5, rtol=1e-5)
    # The integrations' view: the LM head's input, captured during the model's own forward.
    from hpd.integrations import _CaptureHidden

    with torch.no_grad(), _CaptureHidden(model) as cap:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        captured = head.logits(cap.hidden).float()
    assert (captured - ref).abs().max() < 1e-5 * max(1.0, ref.abs().max())


# The cache builder's check runs for these by default (the transform-bearing architectures and
# llama); for every other buildable architecture in the slow sweep (`make test-slow`): each saves
# the model, loads it back in the builder and runs it, about a second apiece.
CACHE_FAST = ("gemma2", "granite", "cohere", "llama")


def _cache_params():
    return [pytest.param(t, marks=() if t in CACHE_FAST else pytest.mark.slow) for t in TYPES if t not in SKIPPED]


@pytest.mark.parametrize("model_type", _cache_params())
def test_the_teacher_cache_holds_the_models_log_probabilities(model_type, tmp_path):
    """The cache built from the saved model holds its log-probabilities (K = V, float32) to 1e-5, or
    the builder refuses it by name as `lm_head_of` does."""
    from hpd.config import DataConfig
    from hpd.data.collate import build_batch
    from hpd.data.encode import encode_file
    from hpd.models.loading import save_model
    from hpd.teachers.cache import TeacherCache, build_teacher_cache
    from hpd.models.tokenizer import byte_tokenizer

    model, tok = built(model_type), byte_tokenizer()
    if isinstance(model, Exception):
        pytest.fail(f"{model_type} did not build tiny and is not in SKIPPED: {type(model).__name__}: {model}")
    teacher_dir = save_model(model, tok, tmp_path / "teacher")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "ab", "completion": "cdef"}\n{"prompt": "xyz", "completion": "uv"}\n')
    build = dict(top_k=10**6, dtype="float32", data=DataConfig(max_length=16), log=None)
    if model_type in REFUSED:
        with pytest.raises(HPDError, match=model_type):
            build_teacher_cache(teacher_dir, [data], tmp_path / "cache", **build)
        assert not (tmp_path / "cache").exists()
        return
    cache = TeacherCache(build_teacher_cache(teacher_dir, [data], tmp_path / "cache", **build))
    transform = lm_head_of(model).transform
    assert cache.manifest["logit_transform"] == {"scale": transform.scale, "softcap": transform.softcap}
    if model_type in TRANSFORMED:
        assert cache.manifest["logit_transform"]["softcap" if model_type == "gemma2" else "scale"] == (
            {"gemma2": 3.0, "granite": 0.25, "cohere": 0.25}[model_type])
    examples = encode_file(str(data), tok, DataConfig(max_length=16))[0]
    b = build_batch([e.prompt_ids for e in examples], [e.completion_ids for e in examples], pad_id=tok.pad_token_id)
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                      use_cache=False).logits.float(), -1)
    labels = b["labels"]
    view = cache.teacher(cache.rows_of(examples, "test"), labels)
    pos = (labels.reshape(-1) != -100).nonzero().squeeze(1)
    logp = view.chunker(VOCAB, 1.0)(pos, labels.reshape(-1)[pos]).logp
    torch.testing.assert_close(logp, ref.reshape(-1, VOCAB)[pos], atol=1e-5, rtol=1e-5)
    # A cache from before the transform was applied (no record of it) is refused when its teacher has one.
    import json

    manifest = cache.path / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["logit_transform"]
    manifest.write_text(json.dumps(m))
    old = TeacherCache(cache.path)
    from hpd.models.head import logit_transform_field

    if logit_transform_field(json.loads((teacher_dir / "config.json").read_text())) is None:
        old.check_run()
    else:
        with pytest.raises(HPDError, match="skipped its teacher's"):
            old.check_run()


@pytest.mark.parametrize("model_type", sorted(TRANSFORMED))
@pytest.mark.parametrize("name", ["fkl", "hpd"])
def test_chunked_gradients_equal_autograd_through_the_models_logits(model_type, name):
    model = built(model_type)
    assert not lm_head_of(model).transform.is_identity  # the transform is what is under test
    ids, mask = _batch()
    labels = _labels(ids, mask)
    with torch.no_grad():
        teacher = model(input_ids=ids, attention_mask=mask).logits * 0.7 + 0.3
    obj = get_objective(name)
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for chunked in (False, True):
        g = torch.Generator().manual_seed(5)
        if chunked:
            hidden = final_hidden_states(model, ids, mask)
            out = obj.chunked(hidden, lm_head_of(model), teacher, labels, chunk_size=4, generator=g)
        else:
            out = obj(model(input_ids=ids, attention_mask=mask).logits, teacher, labels, generator=g)
        results.append((out.loss, torch.autograd.grad(out.loss, params, allow_unused=True)))
    (a, ga), (c, gc) = results
    assert float(c) == pytest.approx(float(a), rel=1e-5)
    compared = 0
    for x, y in zip(gc, ga):
        if y is not None:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
            compared += 1
    assert compared > 3


def test_an_unknown_logit_transform_is_refused_by_name():
    model = built("llama")
    model.config.logits_scaling = 2.0  # a field hpd does not know llama to apply
    try:
        with pytest.raises(HPDError, match="logits_scaling=2.0"):
            lm_head_of(model)
    finally:
        del model.config.logits_scaling
    assert lm_head_of(model).transform.is_identity


def test_hpd_train_refuses_such_a_teacher_before_the_run_starts(tmp_path, repo_root, monkeypatch):
    from hpd.config import load_config
    from hpd.models.loading import load_model, save_model
    from hpd.training.trainer import train

    monkeypatch.chdir(repo_root)
    model, tok = load_model("tiny", tiny={"num_layers": 1, "hidden_size": 32}, seed=1)
    model.config.logits_scaling = 2.0  # a logit transform hpd does not know llama to apply
    teacher = save_model(model, tok, tmp_path / "teacher")
    out = tmp_path / "run"
    cfg = load_config("configs/tiny.yaml", [f"output_dir={out}", f"teacher.path={teacher}", "max_steps=1",
                                            "log.progress=false", "log.tensorboard=off"])
    with pytest.raises(HPDError, match="logits_scaling=2.0"):
        train(cfg)
    assert not list(out.glob("checkpoint*")) and not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("transform", [dict(scale=0.25), dict(softcap=2.0), dict(scale=3.0, softcap=5.0)])
@pytest.mark.parametrize("name", ["fkl", "rkl", "jsd", "hpd", "tvd"])
def test_the_chunked_loss_through_a_transformed_head_equals_autograd(name, transform):
    """Loss and gradients (hidden states, weight, bias) against autograd through LMHead.logits, at temperature 2."""
    from hpd.objectives import LMHead, LogitTransform

    g = torch.Generator().manual_seed(0)
    h = (torch.randn(2, 6, 8, generator=g) * 3).requires_grad_()
    W = torch.randn(20, 8, generator=g).requires_grad_()
    b = torch.randn(20, generator=g).requires_grad_()
    head = LMHead(W, b, LogitTransform(**transform))
    teacher = torch.randn(2, 6, 20, generator=g) * 4
    labels = torch.randint(0, 20, (2, 6), generator=g)
    labels[0, :2] = -100
    obj = get_objective(name, temperature=2.0)
    ref = obj(head.logits(h), teacher, labels, generator=torch.Generator().manual_seed(1))
    want = torch.autograd.grad(ref.loss, (h, W, b))
    out = obj.chunked(h, head, teacher, labels, chunk_size=3, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out.loss, (h, W, b))
    assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-5)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_rollout_weights_read_the_policy_through_the_transformed_head():
    from hpd.objectives import LMHead, LogitTransform, rollout_weights

    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(2, 5, 8, generator=g) * 3, torch.randn(20, 8, generator=g)
    head = LMHead(W, None, LogitTransform(scale=0.5, softcap=2.0))
    labels = torch.randint(0, 20, (2, 5), generator=g)
    rw, _ = rollout_weights(get_objective("hpd"), h, head, torch.randn(2, 5, 20, generator=g), labels, chunk_size=3,
                            generator=torch.Generator().manual_seed(1))
    want = torch.log_softmax(head.logits(h), -1).gather(-1, rw.tokens)
    torch.testing.assert_close(rw.old_logp, want, atol=1e-5, rtol=1e-5)
