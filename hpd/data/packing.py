"""Sequence packing (`data.packing=true`): several rows of a micro-batch per sequence.

The rows of a micro-batch are laid end to end, in batch order, into packed rows of `data.pack_length`
tokens at most (0: the longest row's length, so attention never costs more than padded; a large
value: the whole micro-batch in one row, no padding at all). Each row's positions restart at 0
(`position_ids`) and no 2D attention mask is passed, so Hugging Face's mask builder (transformers
>= 4.53, `masking_utils.find_packed_sequence_indices`) keeps attention within each row: a
block-diagonal causal mask for `eager`, `sdpa` and `flex_attention`, the varlen kernels for
`flash_attention_2/3`. Other attention implementations would let rows attend to each other and are
refused (`check_packing`), as is a model whose packed forward differs from its padded one (a probe
at set-up).

Labels stay as `hpd.data.collate.build_batch` shifts them, row by row: a row's last position predicts
nothing, so no target crosses a row boundary, and the active positions keep their batch order, so
the loss, its normalization (the global token count) and the draws of sampled objectives are those
of the padded batch.

    >>> import torch
    >>> from hpd.data.packing import Packing
    >>> p = Packing([3, 2, 4], width=5)   # rows of 3, 2 and 4 tokens, at most 5 per packed row
    >>> p.bins, p.position_ids().tolist()
    ([[0, 1], [2]], [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]])
    >>> padded = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    >>> p.pack(padded, fill=0).tolist()
    [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
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
    """Where each row of a padded batch `(B, T, ...)` sits in its packed form `(R, W, ...)`.

    lengths: `(B,)` the rows' token counts (prompt + completion). The rows are laid end to end in
    batch order, a new packed row starting when the next row would pass the capacity (next fit:
    the order of the tokens, and so of the loss's positions and draws, stays the padded batch's).
    width: the capacity in tokens; 0 = the longest row, so that no packed row is longer than a
    padded one and attention (quadratic in the row) never costs more than with padding; a width of
    at least the sum of the lengths puts every row into one packed row (no padding at all). `bins`
    (the rows of each packed row) lays other sequences of the same rows out alike (OPSD's teacher).
    Packed rows shorter than `W` end with padding that forms a segment of its own.
    """

    def __init__(self, lengths: Sequence[int], width: int = 0, bins: list[list[int]] | None = None):
        self.lengths = [int(n) for n in lengths]
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"packing needs non-empty rows, got lengths {self.lengths}")
        if bins is None:
            cap = max(max(self.lengths), min(width, sum(self.lengths)))
            bins, used = [[]], 0
            for b, n in enumerate(self.lengths):
                if used + n > cap:
                    bins, used = bins + [[]], 0
                bins[-1].append(b)
                used += n
        self.bins = bins
        self.row_of, self.offsets = [0] * len(self.lengths), [0] * len(self.lengths)
        for r, rows in enumerate(bins):
            at = 0
            for b in rows:
                self.row_of[b], self.offsets[b], at = r, at, at + self.lengths[b]
        self.width = max(sum(self.lengths[b] for b in rows) for rows in bins)

    def like(self, lengths: Sequence[int]) -> Packing:
        """Other sequences of the same rows (`(B,)` lengths), packed into the same packed rows."""
        return Packing(lengths, bins=self.bins)

    def _source(self, T: int) -> Tensor:
        """`(R * W,)` the flat index `b * T + t` of each packed position's padded one, -1 on padding."""
        src = torch.full((len(self.bins), self.width), -1, dtype=torch.long)
        for b, n in enumerate(self.lengths):
            src[self.row_of[b], self.offsets[b]:self.offsets[b] + n] = b * T + torch.arange(n)
        return src.reshape(-1)

    def pack(self, x: Tensor, fill: float | int = 0) -> Tensor:
        """A padded per-position tensor `(B, T, ...)` in packed form `(R, W, ...)`, `fill` on padding."""
        B, T = x.shape[:2]
        if B != len(self.lengths) or T < max(self.lengths):
            raise ValueError(f"cannot pack a {tuple(x.shape)} tensor with row lengths {self.lengths}")
        src = self._source(T).to(x.device)
        out = x.reshape(B * T, *x.shape[2:])[src.clamp(min=0)]
        out[src < 0] = fill
        return out.reshape(len(self.bins), self.width, *x.shape[2:])

    def position_ids(self, device: torch.device | None = None) -> Tensor:
        """`(R, W)` long: each row's positions, restarting at 0 (a packed row's padding too)."""
        pos = torch.zeros(len(self.bins), self.width, dtype=torch.long)
        for r, rows in enumerate(self.bins):
            at = 0
            for n in [self.lengths[b] for b in rows] + [self.width - sum(self.lengths[b] for b in rows)]:
                pos[r, at:at + n] = torch.arange(n)
                at += n
        return pos.to(device)

    def pack_index(self, index: Tensor, target: Packing) -> Tensor:
        """A gather index `(B, T)` into padded sequences `(B, T')` (OPSD's aligned teacher positions)
        as one into their packed form `target` (`self.like(...)`), at this packing's positions: `(R, W)`."""
        shift = torch.tensor(target.offsets, dtype=index.dtype, device=index.device)[:, None]
        return self.pack(index + shift)

    def pack_view(self, view):
        """A teacher view of `(B, T, ...)` tensors (a `TopKTeacher` from a cache, logits) packed."""
        if isinstance(view, Tensor):
            return self.pack(view)
        changes = {f.name: self.pack(getattr(view, f.name)) for f in dataclasses.fields(view)
                   if isinstance(getattr(view, f.name), Tensor) and getattr(view, f.name).dim() >= 2}
        return dataclasses.replace(view, **changes)


@torch.no_grad()
def check_packing(model: nn.Module, role: str = "student") -> None:
    """Refuse packing for a model whose attention would not stay within each packed row.

    Its attention implementation must be one of `PACKED_ATTENTION`, and a probe (two short rows,
    packed and padded) must give the same final hidden states: a model whose code ignores
    position_ids or builds its own mask fails here rather than training on leaked attention.
    """
    from hpd.models.head import final_hidden_states

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
    p = Packing(lengths, width=sum(lengths))
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


__all__ = ["PACKED_ATTENTION", "Packing", "check_packing"]
