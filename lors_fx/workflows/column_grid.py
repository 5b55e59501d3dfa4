"""The grid a GPTQ / SparseGPT column sweep fills (:mod:`lors_fx.workflows.quantize`): the scales
of each group, set when the sweep reaches the group (from the error-updated weights), and the
codes of the columns rounded so far, on :mod:`lors_fx.quant`'s sparsity-aware grid."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lors_fx.quant import compute_scales, round_to_codes, search_scales

__all__ = ["ColumnGrid"]


class ColumnGrid:
    """The quantization grid of one ``(rows, cols)`` weight, filled during a column sweep: the
    scales (in ``dtype``) and the ``int8`` codes of the columns rounded so far."""

    def __init__(self, bits: int, group_size: Optional[int], rows: int, cols: int,
                 dtype: torch.dtype, device=None):
        self.bits, self.dtype = bits, dtype
        self.group = cols if group_size is None else group_size
        self.dynamic = self.group < cols  # False: one scale per row, set before the sweep
        self.scales = torch.zeros(rows, cols // self.group, dtype=dtype, device=device)
        #: per input column, the calibration inputs' sums of squares: scales are searched under
        #: this weighting (lors_fx.quant.search_scales); None: absmax / qmax
        self.importance: Optional[Tensor] = None
        self.codes = torch.zeros(rows, cols, dtype=torch.int8, device=device)

    def set_scales(self, first_col: int, values: Tensor, kept: Tensor) -> None:
        """Scales of the whole groups ``values`` covers (from column ``first_col``): absmax of
        the kept values / qmax; a group with kept weights gets a positive scale."""
        rows, width = values.shape
        groups = width // self.group
        if self.importance is not None:
            scales = search_scales(values, self.bits, self.group,
                                   self.importance[first_col:first_col + width], kept,
                                   dtype=self.dtype)
        else:
            scales = compute_scales(values.masked_fill(~kept, 0.0), self.bits, self.group,
                                    dtype=self.dtype)
        has_kept = kept.reshape(rows, groups, self.group).any(-1)
        # all kept values exactly 0 (absmax 0): any positive scale rounds them to +-1
        scales = torch.where(has_kept & (scales == 0),
                             torch.full_like(scales, torch.finfo(self.dtype).tiny), scales)
        start = first_col // self.group
        self.scales[:, start:start + groups] = scales

    def starts_group(self, col: int) -> bool:
        return self.dynamic and col % self.group == 0

    def round_column(self, col: int, w: Tensor, kept: Tensor) -> Tensor:
        """Codes of column ``col`` (stored) from fp32 values ``w``; returns ``dq`` in fp32, exactly
        as the stored layer dequantizes it (codes times scale, in the scales' dtype)."""
        scale = self.scales[:, col // self.group].unsqueeze(1)
        codes = round_to_codes(w.unsqueeze(1).contiguous(), scale, kept.unsqueeze(1), self.bits)
        self.codes[:, col] = codes[:, 0]
        return (codes.float() * scale.float()).to(self.dtype).float()[:, 0]
