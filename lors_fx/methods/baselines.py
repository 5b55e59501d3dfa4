"""Reference fine-tuning methods for pruned linears, to compare LoRS against on the same model.

Every wrapper takes a frozen sparse ``nn.Linear`` and shares its ``weight``/``bias`` Parameters
(no copy). ``W`` is d_out x d_in, ``M = (W != 0)``, ``s`` the adapter scale, ``x`` (..., d_in).

=================  ===========================================================  ===============
method             forward (the formula each wrapper implements)                keeps M?
=================  ===========================================================  ===============
``lora``           ``y = x W^T + b + s (x A^T) B^T``  (PEFT LoRA)                no
``sqft``           ``y = x (W + s (B A) * M)^T + b``  (SQFT SparsePEFT)         yes
``spp``            ``y = x W^T + b + x (W * s Wb rep(Wa))^T``  (SPP)            yes
``full_sparse_ft`` ``y = x W^T + b``, W trainable, ``W <- W * M`` after a step  yes
``lors``           same as ``sqft``, through :func:`lors_fx.ops.sparse_lora_linear`  yes
=================  ===========================================================  ===============

Each wrapper has ``formula(x)`` (the formula in plain torch, differentiated by autograd; LoRS's
``grad_mode="lors"`` uses its closed-form straight-through gradient instead), ``merged_weight()``
and ``merge()`` (a plain ``nn.Linear`` with the merged weight). The registry
(:mod:`lors_fx.methods.registry`: :func:`~lors_fx.methods.registry.apply_method`,
:data:`~lors_fx.methods.registry.METHODS`) swaps the target linears of a model for one wrapper.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lors_fx.ops import build_merged_weight, reference_sparse_lora_linear, sparse_lora_linear

__all__ = ["LoraLinear", "SqftLinear", "SppLinear", "FullSparseFT", "LorsOpLinear",
           "trainable_parameters", "wrapped_modules", "install_mask_reapply", "set_reference_mode",
           "randomize_adapters_", "lors_closed_form"]


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype merges are computed in: float32, or the weight's own if wider."""
    return torch.promote_types(dtype, torch.float32)


class _SparseLinearWrapper(nn.Module):
    """Shared state: the frozen base ``weight``/``bias`` (same Parameter objects as the base)."""

    sparsity_preserving = True

    def __init__(self, base: nn.Linear):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{type(self).__name__}: base must be an nn.Linear, "
                            f"got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        #: when True, ``forward`` runs :meth:`formula` (used for float64 references).
        self.reference_mode = False

    def _factory(self):
        return dict(dtype=self.weight.dtype, device=self.weight.device)

    def forward(self, x: Tensor) -> Tensor:
        """The method's training forward (or :meth:`formula` when ``reference_mode``)."""
        if self.reference_mode:
            return self.formula(x)
        return self._train_forward(x)

    def _train_forward(self, x: Tensor) -> Tensor:
        return self.formula(x)

    def formula(self, x: Tensor) -> Tensor:
        """The method's formula in plain torch (autograd gives the reference gradient)."""
        raise NotImplementedError

    def adapter_parameters(self) -> Dict[str, nn.Parameter]:
        """``{name: parameter}`` of what this method trains."""
        return {name: p for name, p in self.named_parameters() if name not in ("weight", "bias")}

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """The weight a merged model would hold (a new tensor in the weight's dtype)."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain frozen ``nn.Linear`` holding :meth:`merged_weight` (the wrapper is unchanged)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           **self._factory())
        linear.weight.copy_(self.merged_weight())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class _LowRankWrapper(_SparseLinearWrapper):
    """``lora_A`` (r x d_in, Kaiming-uniform) and ``lora_B`` (d_out x r, zeros): PEFT's init."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__(base)
        if r < 1:
            raise ValueError(f"{type(self).__name__}: r must be >= 1, got {r}")
        self.r, self.scaling = r, float(alpha) / r
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **self._factory()))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **self._factory()))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.r}, scaling={self.scaling:g}"


class LoraLinear(_LowRankWrapper):
    """PEFT-style dense LoRA (Hu et al. 2021), NOT sparsity-preserving.

    ``y = x W^T + b + s (x A^T) B^T``; merged ``W' = W + s B A`` is dense: merging fills M's zeros.
    """

    sparsity_preserving = False

    def formula(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(
            F.linear(x, self.lora_A), self.lora_B)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        wide = _wide(self.weight.dtype)
        merged = torch.addmm(self.weight.to(wide), self.lora_B.to(wide), self.lora_A.to(wide),
                             alpha=self.scaling)
        return merged.to(self.weight.dtype)


class SqftLinear(_LowRankWrapper):
    """SQFT's SparsePEFT (Munoz et al. 2024, arXiv 2410.03750): the masked adapter, naive autograd.

    ``W' = W + s (B A) * M`` is materialised every forward, ``y = x W'^T + b``; autograd keeps a
    dense d_out x d_in tensor alive for backward and forms the dense ``g^T x`` for the adapter
    gradients. Same math as :func:`lors_fx.ops.reference_sparse_lora_linear` (one dense matmul, the
    cheaper of SQFT's two naive forms).
    """

    def formula(self, x: Tensor) -> Tensor:
        return reference_sparse_lora_linear(x, self.weight, self.lora_A, self.lora_B, self.bias,
                                            self.scaling)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        return build_merged_weight(self.weight, self.lora_A, self.lora_B, self.scaling)


class LorsOpLinear(_LowRankWrapper):
    """LoRS (arXiv 2501.08582) through the custom op :func:`lors_fx.ops.sparse_lora_linear`.

    Forward as :class:`SqftLinear`: ``y = x (W + s (B A) * M)^T + b``. ``grad_mode="lors"``:
    ``dB = s g^T (x A^T)``, ``dA = s (g B)^T x``, ``dx = g W'`` (straight-through the mask);
    ``"exact"``: the autograd gradient of the formula. ``recompute=False`` keeps ``W'``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, grad_mode: str = "lors",
                 recompute: bool = True, chunk_bytes: Optional[int] = None):
        super().__init__(base, r, alpha)
        self.grad_mode, self.recompute, self.chunk_bytes = grad_mode, recompute, chunk_bytes

    def _train_forward(self, x: Tensor) -> Tensor:
        return sparse_lora_linear(x, self.weight, self.lora_A, self.lora_B, bias=self.bias,
                                  scaling=self.scaling, grad_mode=self.grad_mode,
                                  recompute=self.recompute, chunk_bytes=self.chunk_bytes)

    def formula(self, x: Tensor) -> Tensor:
        if self.grad_mode == "lors":
            return lors_closed_form(x, self.weight, self.lora_A, self.lora_B, self.bias,
                                    self.scaling)
        return reference_sparse_lora_linear(x, self.weight, self.lora_A, self.lora_B, self.bias,
                                            self.scaling)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        return build_merged_weight(self.weight, self.lora_A, self.lora_B, self.scaling)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", grad_mode={self.grad_mode}, recompute={self.recompute}"


class _LorsClosedForm(torch.autograd.Function):
    """LoRS's paper gradient written out (independent of ops.py), for references and tests."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling):
        w_eff = weight + scaling * (lora_B @ lora_A) * (weight != 0)
        ctx.save_for_backward(x, w_eff, lora_A, lora_B)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return F.linear(x, w_eff, bias)

    @staticmethod
    def backward(ctx, g):
        x, w_eff, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        grad_B = s * g2.t() @ (x2 @ lora_A.t())
        grad_A = s * (g2 @ lora_B).t() @ x2
        grad_bias = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        return (g @ w_eff, None, grad_A, grad_B, grad_bias, None)


def lors_closed_form(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                     bias: Optional[Tensor] = None, scaling: float = 1.0) -> Tensor:
    """``y = x (W + s (B A) * M)^T + b`` with LoRS's closed-form (straight-through) backward.

    ``dB = s g^T (x A^T)``, ``dA = s (g B)^T x``, ``dx = g W'``, ``dbias = sum(g)``: the reference
    of ``grad_mode="lors"``, written independently of :mod:`lors_fx.ops` (keeps W' for backward).
    """
    return _LorsClosedForm.apply(x, weight, lora_A, lora_B, bias, scaling)


class SppLinear(_SparseLinearWrapper):
    """SPP (Lu et al., ICML 2024, arXiv 2405.16057), as in the authors' code (Lucky-Lance/SPP).

    Learnable row matrix ``Wa`` (``rows`` x d_in, Kaiming-uniform; rows=16 in the authors' code)
    and column vector ``Wb`` (d_out x 1, zeros). ``rep(Wa)`` repeats row k of ``Wa`` over the k-th
    block of ``ceil(d_out/rows)`` consecutive output rows (``repeat_interleave``)::

        dW = s * (Wb * rep(Wa)) * W          W' = W + dW          y = x W^T + b + x dW^T

    ``dW`` is a multiple of ``W`` entry-wise, so M is kept in training and merge.
    ``form="blocks"`` is the authors' forward: per block k, ``F.linear(x * Wa[k], W_k)``, then
    ``* s * Wb``. ``form="dense"`` materialises ``dW`` and does one matmul; ``checkpoint=True``
    (dense form) wraps the ``dW`` build and its matmul in ``torch.utils.checkpoint``
    (``use_reentrant=False``), so ``dW`` is not kept for backward.
    """

    def __init__(self, base: nn.Linear, alpha: float, r: int, rows: int = 16,
                 form: str = "blocks", checkpoint: bool = False):
        super().__init__(base)
        if form not in ("blocks", "dense"):
            raise ValueError(f"SppLinear: form must be 'blocks' or 'dense', got {form!r}")
        if checkpoint and form != "dense":
            raise ValueError("SppLinear: checkpoint=True needs form='dense'")
        self.scaling, self.form, self.use_checkpoint = float(alpha) / r, form, checkpoint
        self.block_rows = math.ceil(self.out_features / rows)
        blocks = math.ceil(self.out_features / self.block_rows)
        self.spp_alpha = nn.Parameter(torch.empty(blocks, self.in_features, **self._factory()))
        self.spp_beta = nn.Parameter(torch.zeros(self.out_features, 1, **self._factory()))
        nn.init.kaiming_uniform_(self.spp_alpha, a=math.sqrt(5))

    def _factor(self) -> Tensor:
        """``s * Wb * rep(Wa)``: d_out x d_in."""
        rep = self.spp_alpha.repeat_interleave(self.block_rows, dim=0)[: self.out_features]
        return (self.scaling * self.spp_beta) * rep

    def _dense_delta_out(self, x: Tensor) -> Tensor:
        return F.linear(x, self._factor() * self.weight)

    def formula(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + self._dense_delta_out(x)

    def _train_forward(self, x: Tensor) -> Tensor:
        base = F.linear(x, self.weight, self.bias)
        if self.form == "dense":
            if self.use_checkpoint:
                return base + checkpoint(self._dense_delta_out, x, use_reentrant=False)
            return base + self._dense_delta_out(x)
        outs = [F.linear(x * self.spp_alpha[k], self.weight[k * self.block_rows:
                                                              (k + 1) * self.block_rows])
                for k in range(self.spp_alpha.shape[0])]
        return base + torch.cat(outs, dim=-1) * (self.scaling * self.spp_beta.t())

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        w32 = self.weight.to(_wide(self.weight.dtype))
        merged = (w32 + self._factor().to(w32.dtype) * w32).to(self.weight.dtype)
        return torch.where(self.weight != 0, merged, self.weight)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", rows={self.spp_alpha.shape[0]}, "
                f"scaling={self.scaling:g}, form={self.form}, checkpoint={self.use_checkpoint}")


class FullSparseFT(_SparseLinearWrapper):
    """Full fine-tuning of the pruned weight: ``y = x W^T + b`` with ``W`` trainable.

    The gradient is dense; after every optimizer step :meth:`reapply_mask_` sets ``W <- W * M``
    (M kept as a bool buffer ``pruned = (W == 0)``). :func:`install_mask_reapply` registers it
    as an optimizer step hook.
    """

    def __init__(self, base: nn.Linear):
        super().__init__(base)
        self.weight.requires_grad_(True)
        self.register_buffer("pruned", self.weight.detach() == 0, persistent=False)

    def formula(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def adapter_parameters(self) -> Dict[str, nn.Parameter]:
        return {"weight": self.weight}

    @torch.no_grad()
    def reapply_mask_(self) -> None:
        """Zero the pruned positions again (in place)."""
        self.weight.masked_fill_(self.pruned, 0)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        return self.weight.detach().clone()


def install_mask_reapply(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Register a step post-hook on ``optimizer`` that re-applies every FullSparseFT mask."""
    modules = [m for m in model.modules() if isinstance(m, FullSparseFT)]

    def hook(_optimizer, _args, _kwargs):
        for module in modules:
            module.reapply_mask_()

    return optimizer.register_step_post_hook(hook)


def trainable_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters of ``model`` that require grad (what the optimizer should get)."""
    return [p for p in model.parameters() if p.requires_grad]


def wrapped_modules(model: nn.Module) -> Dict[str, _SparseLinearWrapper]:
    """``{qualified name: wrapper}`` of every baseline wrapper in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _SparseLinearWrapper)}


def set_reference_mode(model: nn.Module, enabled: bool = True) -> None:
    """Make every wrapper's forward run its plain formula (for float64 references)."""
    for module in wrapped_modules(model).values():
        module.reference_mode = enabled


@torch.no_grad()
def randomize_adapters_(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Give every zero-initialised adapter factor (``lora_B``, ``spp_beta``) random values.

    With PEFT's init the adapter is the identity at step 0; a benchmark wants every product and
    gradient to be non-trivial so that numerical agreement means something.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if name.endswith(("lora_B", "spp_beta")):
            values = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            parameter.copy_(values * std)
