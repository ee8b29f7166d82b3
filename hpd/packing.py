"""Sequence packing (`data.packing=true`): a micro-batch's rows as one sequence, without padding.

The rows of a micro-batch are laid end to end in one packed row `(1, L)`, `L` the sum of their
lengths, in batch order: no padding token reaches the forward. Each row's positions restart at 0
(`position_ids`) and no 2D attention mask is passed, so Hugging Face's mask builder (transformers
>= 4.53, `masking_utils.find_packed_sequence_indices`) keeps attention within each row: a
block-diagonal causal mask for `eager`, `sdpa` and `flex_attention`, the varlen kernels for
`flash_attention_2/3`. Other attention implementations would let rows attend to each other and are
refused (`check_packing`), as is a model whose packed forward differs from its padded one (a probe
at set-up).

Labels stay as `hpd.data.build_batch` shifts them, row by row: a row's last position predicts
nothing, so no target crosses a row boundary, and the active positions keep their batch order, so
the loss, its normalization (the global token count) and the draws of sampled objectives are those
of the padded batch.

    >>> import torch
    >>> from hpd.packing import Packing
    >>> p = Packing([3, 2])
    >>> p.position_ids().tolist()
    [[0, 1, 2, 0, 1]]
    >>> padded = torch.tensor([[5, 6, 7], [8, 9, 0]])
    >>> p.pack(padded).tolist()
    [[5, 6, 7, 8, 9]]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hpd.errors import HPDError

# Attention implementations whose mask (or kernel) transformers derives from restarted position_ids.
PACKED_ATTENTION = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")


class Packing:
    """Where each row of a padded batch `(B, T, ...)` sits in its packed form `(1, L, ...)`.

    lengths: `(B,)` the rows' token counts (prompt + completion); row b occupies columns
    `offsets[b] : offsets[b] + lengths[b]` of the one packed row.
    """

    def __init__(self, lengths: Sequence[int]):
        self.lengths = [int(n) for n in lengths]
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"packing needs non-empty rows, got lengths {self.lengths}")
        self.offsets = [0]
        for n in self.lengths[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.width = self.offsets[-1] + self.lengths[-1]

    def _source(self, T: int) -> Tensor:
        """`(L,)` the flat index `b * T + t` of each packed column's padded position."""
        return torch.cat([b * T + torch.arange(n) for b, n in enumerate(self.lengths)])

    def pack(self, x: Tensor) -> Tensor:
        """A padded per-position tensor `(B, T, ...)` in packed form `(1, L, ...)`."""
        B, T = x.shape[:2]
        if B != len(self.lengths) or T < max(self.lengths):
            raise ValueError(f"cannot pack a {tuple(x.shape)} tensor with row lengths {self.lengths}")
        flat = x.reshape(B * T, *x.shape[2:])
        return flat[self._source(T).to(x.device)].unsqueeze(0)

    def position_ids(self, device: torch.device | None = None) -> Tensor:
        """`(1, L)` long: each row's positions, restarting at 0."""
        return torch.cat([torch.arange(n) for n in self.lengths]).unsqueeze(0).to(device)

    def pack_index(self, index: Tensor, target: Packing) -> Tensor:
        """A gather index `(B, T)` into padded sequences `(B, T')` (OPSD's aligned teacher positions)
        as one into their packed form `target` `(1, L')`, at this packing's positions: `(1, L)`."""
        shift = torch.tensor(target.offsets, dtype=index.dtype, device=index.device)[:, None]
        return self.pack(index + shift)

    def pack_view(self, view):
        """A teacher view of `(B, T, ...)` tensors (a `TopKTeacher` from a cache, logits) packed."""
        if isinstance(view, Tensor):
            return self.pack(view)
        changes = {f.name: self.pack(getattr(view, f.name)) for f in dataclasses.fields(view)
                   if isinstance(getattr(view, f.name), Tensor) and getattr(view, f.name).dim() >= 2}
        return dataclasses.replace(view, **changes)


def model_inputs(attention_mask: Tensor | None, position_ids: Tensor | None) -> dict[str, Tensor | None]:
    """The mask arguments of a forward: a packed batch gives position_ids and no 2D mask (HF then
    builds the per-row mask from the restarted positions), a padded one its attention mask."""
    if position_ids is not None:
        return {"attention_mask": None, "position_ids": position_ids}
    return {"attention_mask": attention_mask}


@torch.no_grad()
def check_packing(model: nn.Module, role: str = "student") -> None:
    """Refuse packing for a model whose attention would not stay within each packed row.

    Its attention implementation must be one of `PACKED_ATTENTION`, and a probe (two short rows,
    packed and padded) must give the same final hidden states: a model whose code ignores
    position_ids or builds its own mask fails here rather than training on leaked attention.
    """
    from hpd.models import final_hidden_states

    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in PACKED_ATTENTION:
        raise HPDError(f"data.packing: the {role}'s attention implementation is {impl!r}, which does not keep "
                       f"attention within packed rows; supported: {', '.join(PACKED_ATTENTION)} (load the model "
                       "with one of them) or set data.packing=false")
    param = next(model.parameters())
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 2:
        return
    lengths = [6, 4]
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, vocab, (n,), generator=g) for n in lengths]
    padded = torch.zeros(2, max(lengths), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for b, r in enumerate(rows):
        padded[b, :len(r)], mask[b, :len(r)] = r, 1
    p = Packing(lengths)
    was_training = model.training
    model.eval()
    try:
        dev = param.device
        ref = final_hidden_states(model, padded.to(dev), mask.to(dev)).float()
        out = final_hidden_states(model, p.pack(padded).to(dev), None, position_ids=p.position_ids(dev)).float()
    finally:
        model.train(was_training)
    ref = p.pack(ref)
    # Leaked attention moves the second row's states by O(their scale); rounding (bf16) by far less.
    tol = (1e-3 if param.dtype == torch.float32 else 5e-2) * float(ref.abs().max().clamp_min(1e-6))
    err = float((out - ref).abs().max())
    if not err <= tol:
        raise HPDError(f"data.packing: the {role} ({type(model).__name__}, attention {impl!r}) gives other hidden "
                       f"states for packed rows than for padded ones (max difference {err:.3g}): its code does not "
                       "restart positions or keep attention within rows; set data.packing=false")


__all__ = ["PACKED_ATTENTION", "Packing", "check_packing", "model_inputs"]
