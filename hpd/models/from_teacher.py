"""Students initialised from a teacher: a subset of its decoder layers (`student.init_from_teacher`,
`student.layers`), built in memory or saved as a model directory.

    >>> parse_layer_spec("0,2,5", num_layers=6)
    [0, 2, 5]
    >>> parse_layer_spec("every:2", num_layers=6)
    [0, 2, 4]
"""

from __future__ import annotations

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import torch
from transformers import PreTrainedModel

from hpd.errors import HPDError
from hpd.models.loading import _resolve_dtype, load_model, save_model


def parse_layer_spec(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """Teacher layer indices that a student keeps, from a spec, for a teacher of `num_layers`.

    Specs: ``every:K`` (layers 0, K, 2K, ...), ``spread:N`` (N layers evenly spaced from the first
    to the last, both kept), or an explicit list ``"0,3,7"`` / ``[0, 3, 7]`` (increasing, unique).

        >>> parse_layer_spec("every:3", 30)
        [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
        >>> parse_layer_spec("spread:4", 10)
        [0, 3, 6, 9]
        >>> parse_layer_spec("0,5,9", 10)
        [0, 5, 9]
    """
    how = "use every:K, spread:N or a comma-separated list of layer indices like 0,3,7"
    if isinstance(spec, str):
        text = spec.strip().lower().replace(" ", "")
        kind, _, arg = text.partition(":")
        if kind in ("every", "spread"):
            try:
                k = int(arg)
            except ValueError:
                raise HPDError(f"layer spec '{spec}': '{arg}' is not an integer; {how}") from None
            if kind == "every":
                if not 1 <= k <= num_layers:
                    raise HPDError(f"layer spec '{spec}': K must be in 1..{num_layers} (the teacher's layers)")
                return list(range(0, num_layers, k))
            if not 1 <= k <= num_layers:
                raise HPDError(f"layer spec '{spec}': N must be in 1..{num_layers} (the teacher's layers)")
            if k == 1:
                return [0]
            return [round(i * (num_layers - 1) / (k - 1)) for i in range(k)]
        try:
            layers = [int(x) for x in text.split(",") if x != ""]
        except ValueError:
            raise HPDError(f"layer spec '{spec}' is not understood; {how}") from None
    else:
        layers = [int(x) for x in spec]
    if not layers:
        raise HPDError(f"layer spec '{spec}' selects no layer; {how}")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise HPDError(f"layer spec '{spec}': indices {bad} are outside 0..{num_layers - 1} (the teacher has "
                       f"{num_layers} layers)")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise HPDError(f"layer spec '{spec}': indices must be strictly increasing (each layer once, in order)")
    return layers


_LAYER_KEY = re.compile(r"^(?P<head>(?:.*\.)?layers)\.(?P<idx>\d+)\.(?P<tail>.+)$")


def init_from_teacher(
    teacher: PreTrainedModel, layers: str | Sequence[int], *, dtype: str | torch.dtype | None = None
) -> PreTrainedModel:
    """A student of the teacher's family keeping a subset of its decoder layers.

    Embeddings, final norm, LM head (tied or not) and the kept layers are copies of the teacher's,
    so the student is a normal HF model that shares the teacher's tokenizer; its layer i is the
    teacher's layer `layers[i]`. Per-layer config lists (e.g. `layer_types`) are subset too.

        >>> teacher, tok = load_model("tiny", tiny={"num_layers": 4, "hidden_size": 32})
        >>> student = init_from_teacher(teacher, "every:2")
        >>> student.config.num_hidden_layers
        2
        >>> torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
        True
    """
    import copy

    n_teacher = int(getattr(teacher.config, "num_hidden_layers", 0) or 0)
    if n_teacher < 1:
        raise HPDError(f"{type(teacher).__name__} has no num_hidden_layers in its config: cannot pick layers from it")
    kept = parse_layer_spec(layers, n_teacher)
    config = copy.deepcopy(teacher.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.num_hidden_layers = len(kept)
    # Per-layer lists in the config (attention kinds, sliding windows) follow their layers.
    for name, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == n_teacher and name != "architectures":
            setattr(config, name, [value[i] for i in kept])
    new_index = {old: new for new, old in enumerate(kept)}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in teacher.state_dict().items():
        m = _LAYER_KEY.match(key)
        if m is None:
            state[key] = tensor.detach().clone()
        elif int(m["idx"]) in new_index:
            state[f"{m['head']}.{new_index[int(m['idx'])]}.{m['tail']}"] = tensor.detach().clone()
    with torch.device("meta"):
        student = type(teacher)(config)
    missing, unexpected = student.load_state_dict(state, assign=True, strict=False)
    if unexpected:
        raise HPDError(f"initialising a student from {type(teacher).__name__}: unexpected weights {unexpected[:3]}")
    # Non-persistent buffers (rotary inv_freq) are recomputed from the config, not copied.
    for name, buffer in teacher.named_buffers():
        owner_name, _, attr = name.rpartition(".")
        m = _LAYER_KEY.match(name)
        if m is not None:
            if int(m["idx"]) not in new_index:
                continue
            owner_name = f"{m['head']}.{new_index[int(m['idx'])]}.{m['tail']}".rpartition(".")[0]
        owner = student.get_submodule(owner_name) if owner_name else student
        if getattr(owner, attr, None) is not None and getattr(owner, attr).is_meta:
            owner._buffers[attr] = buffer.detach().clone()
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    still_meta = [n for n, p in student.named_parameters() if p.is_meta]
    if still_meta:
        raise HPDError(f"initialising a student from {type(teacher).__name__}: no teacher weights for {still_meta[:3]}")
    student.generation_config = copy.deepcopy(teacher.generation_config)
    if dtype is not None:
        target = _resolve_dtype(dtype)
        if target != "auto":
            student = student.to(target)
    return student.train(True)


def save_student_from_teacher(teacher: str, layers: str | Sequence[int], out_dir: str | os.PathLike, *,
                              dtype: str = "float32") -> Path:
    """`init_from_teacher` once, written as a plain HF directory with the teacher's tokenizer.

    For runs that must not load the teacher (`teacher.cache`): pass the directory as `student.path`.
    A directory already holding a model is left as it is. Returns `out_dir`.
    """
    out = Path(out_dir)
    if not (out / "config.json").is_file():
        model, tokenizer = load_model(teacher, dtype=dtype)
        save_model(init_from_teacher(model, layers, dtype=dtype), tokenizer, out)
    return out
