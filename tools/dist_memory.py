"""Per-rank memory on paper of sparse-adapter fine-tuning under FSDP2 / ZeRO-3: LoRS vs SQFT.

    python tools/dist_memory.py                                  # both models, N=8,64, T=2048,4096
    python tools/dist_memory.py --model llama2-70b --ranks 8 --seq 4096 --json mem.json
    python tools/dist_memory.py --tablefmt github                # the tables of docs/distributed.md

Every number is computed from the formulas in docs/distributed.md ("Memory per rank on paper");
nothing is measured. Components (bytes per rank; P = base parameters, N = ranks, b*T tokens per
rank, e = 2 (bf16), L_live = L layers, or 1 with per-block activation checkpointing):

    base_shard     P*e/N                                   frozen bf16 base, sharded
    base_gathered  (k*P_block + P_root)*e                  k unsharded blocks (current + prefetch),
                                                           the root (embed, lm_head, norm) stays
                                                           unsharded for the whole step
    adapter_states P_ad*(4+4+8)/N                          fp32 adapters + grads + AdamW m, v
    adapter_live   (k+1)*P_ad_block*4                      unsharded adapters + one block's grads
    act_inputs     L*b*T*h*e                               block inputs (the residual stream)
    act_x          L_live*b*T*(3h+i)*e                     distinct inputs of the 7 adapted linears
    act_rest       L_live*b*T*((3h+2h_kv+3i)*e + 4*(heads+2))   q,k,v, attention out + LSE, norms,
                                                           gate, up, silu(gate)
    act_head       b*T*(4V + h*e)                          fp32 log-probs + final-norm input
    sqft_wprime_mask  SQFT only: L_live*sum_sites d_out*d_in*(e+1)   (bf16 W' + bool mask)
    transient      LoRS: max_site(d_out*d_in)*e + mask chunk (<= 64 MiB); SQFT: 2*max_site*e
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

from tabulate import tabulate

E_BASE = 2            # bf16 frozen base weights and activations
E_ADAPTER = 4         # fp32 adapters; their grads are fp32 too
E_ADAM = 8            # AdamW exp_avg + exp_avg_sq, fp32
MASK_CHUNK = 64 * 2**20   # lors_fx.ops: mask pass buffer on a GPU (_MASK_CHUNK_BYTES_DEFAULT)
METHODS = ("lors", "sqft")
GIB = 2**30


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-style decoder: untied embedding and lm_head, RMSNorm, SwiGLU MLP, GQA."""
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def kv_dim(self) -> int:
        """Output width of k_proj / v_proj: kv_heads * head_dim."""
        return self.kv_heads * (self.hidden // self.heads)


MODELS: Dict[str, ModelSpec] = {
    "llama2-7b": ModelSpec("llama2-7b", 4096, 11008, 32, 32, 32, 32000),
    "llama2-70b": ModelSpec("llama2-70b", 8192, 28672, 80, 64, 8, 32000),
}


def sites(spec: ModelSpec) -> List[Tuple[str, int, int]]:
    """The 7 adapted linears of one block as ``(name, d_out, d_in)``."""
    h, i, kv = spec.hidden, spec.intermediate, spec.kv_dim
    return [("q_proj", h, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, h),
            ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]


def param_counts(spec: ModelSpec, r: int) -> Dict[str, int]:
    """``block`` (base params of one decoder block), ``root`` (embed + lm_head + final norm),
    ``total`` base params, ``adapter_block`` and ``adapter`` (LoRA A and B, all layers)."""
    block = sum(o * i for _, o, i in sites(spec)) + 2 * spec.hidden
    root = 2 * spec.vocab * spec.hidden + spec.hidden
    adapter_block = sum(r * (o + i) for _, o, i in sites(spec))
    return {"block": block, "root": root, "total": spec.layers * block + root,
            "adapter_block": adapter_block, "adapter": spec.layers * adapter_block}


def wprime_mask_bytes(spec: ModelSpec, e: int = E_BASE) -> int:
    """SQFT's extra saved bytes for ONE block: dense W' (e bytes) + bool mask, every site."""
    return sum(o * i * (e + 1) for _, o, i in sites(spec))


def x_bytes_block(spec: ModelSpec, tokens: int, e: int = E_BASE) -> int:
    """Distinct adapted-linear inputs of one block: q/k/v share the attention-norm output,
    gate/up the MLP-norm output; o_proj and down_proj have their own (3h + i per token)."""
    return tokens * (3 * spec.hidden + spec.intermediate) * e


def inspect_meta_totals(spec: ModelSpec, tokens: int, e: int = E_BASE) -> Dict[str, int]:
    """What ``lors-fx inspect --meta`` reports (x counted per site, not deduplicated):
    ``lors`` = sum of T*d_in*e, ``naive`` = lors + all W' + masks, over all layers."""
    lors = spec.layers * sum(tokens * i * e for _, _, i in sites(spec))
    return {"lors": lors, "naive": lors + spec.layers * wprime_mask_bytes(spec, e)}


def _check(spec, method, ranks, seq, batch, r, live_blocks) -> None:
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for name, value in (("ranks", ranks), ("seq", seq), ("batch", batch), ("r", r)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(live_blocks, int) or not 1 <= live_blocks <= spec.layers:
        raise ValueError(f"live_blocks must be in 1..{spec.layers}, got {live_blocks!r}")
    smallest = min(min(o, i) for _, o, i in sites(spec))
    if r > smallest:
        raise ValueError(f"r={r} exceeds the smallest adapted dimension {smallest}")


def per_rank_bytes(spec: ModelSpec, method: str, ranks: int, seq: int, batch: int = 1,
                   r: int = 16, checkpoint: bool = False, live_blocks: int = 2) -> Dict[str, int]:
    """Peak bytes per rank on paper, by component (module docstring), plus ``total``.

    Args:
        spec: the model; method: ``"lors"`` or ``"sqft"``; ranks: N (data-parallel shards);
        seq, batch: T and b of each rank's micro-batch; r: adapter rank (q,k,v,o,gate,up,down);
        checkpoint: per-block activation checkpointing (only block inputs kept; one block is
        recomputed at a time in backward); live_blocks: unsharded blocks at once (2 = prefetch).
    """
    _check(spec, method, ranks, seq, batch, r, live_blocks)
    h, i, tokens = spec.hidden, spec.intermediate, batch * seq
    counts = param_counts(spec, r)
    l_live = 1 if checkpoint else spec.layers
    max_site = max(o * d for _, o, d in sites(spec)) * E_BASE
    rest_per_token = (3 * h + 2 * spec.kv_dim + 3 * i) * E_BASE + 4 * (spec.heads + 2)
    parts = {
        "base_shard": counts["total"] * E_BASE // ranks,
        "base_gathered": (live_blocks * counts["block"] + counts["root"]) * E_BASE,
        "adapter_states": counts["adapter"] * (E_ADAPTER * 2 + E_ADAM) // ranks,
        "adapter_live": (live_blocks + 1) * counts["adapter_block"] * E_ADAPTER,
        "act_inputs": spec.layers * tokens * h * E_BASE,
        "act_x": l_live * x_bytes_block(spec, tokens),
        "act_rest": l_live * tokens * rest_per_token,
        "act_head": tokens * (4 * spec.vocab + h * E_BASE),
        "sqft_wprime_mask": l_live * wprime_mask_bytes(spec) if method == "sqft" else 0,
        "transient": max_site + min(MASK_CHUNK, max_site) if method == "lors" else 2 * max_site,
    }
    parts["total"] = sum(parts.values())
    return parts


def rows(models: Sequence[str], ranks: Sequence[int], seqs: Sequence[int], batch: int, r: int,
         checkpoints: Sequence[bool] = (False, True), live_blocks: int = 2) -> List[dict]:
    """One dict per (model, N, T, checkpoint, method): the components and total in GiB."""
    out = []
    for name in models:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
        spec = MODELS[name]
        for n in ranks:
            for seq in seqs:
                for ckpt in checkpoints:
                    for method in METHODS:
                        parts = per_rank_bytes(spec, method, n, seq, batch, r, ckpt, live_blocks)
                        out.append({"model": name, "N": n, "T": seq, "b": batch,
                                    "ckpt": "block" if ckpt else "none", "method": method,
                                    **{k: v / GIB for k, v in parts.items()}})
    return out


SHORT = {"base_shard": "base/N", "base_gathered": "gathered", "adapter_states": "adapt/N",
         "act_x": "x", "acts_other": "other act", "sqft_wprime_mask": "W'+mask",
         "transient": "transient", "total": "total"}


def display(row: dict) -> dict:
    """A row for printing: adapter_live goes into gathered, the other activations together."""
    shown = {k: row[k] for k in ("N", "T", "ckpt", "method")}
    merged = dict(row, base_gathered=row["base_gathered"] + row["adapter_live"],
                  acts_other=row["act_inputs"] + row["act_rest"] + row["act_head"])
    shown.update({SHORT[k]: merged[k] for k in SHORT})
    return shown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all", choices=[*MODELS, "all"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank-r", type=int, default=16)
    parser.add_argument("--checkpoint", choices=["none", "block", "both"], default="both")
    parser.add_argument("--live-blocks", type=int, default=2)
    parser.add_argument("--tablefmt", default="simple")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    models = list(MODELS) if args.model == "all" else [args.model]
    ckpts = {"none": (False,), "block": (True,), "both": (False, True)}[args.checkpoint]
    try:
        table = rows(models, args.ranks, args.seq, args.batch, args.rank_r, ckpts,
                     args.live_blocks)
    except ValueError as error:
        parser.error(str(error))
    print(f"GiB per rank on paper (not measured); b={args.batch}, r={args.rank_r}, bf16 base "
          f"and activations, fp32 adapters + AdamW, {args.live_blocks} unsharded blocks")
    for name in models:
        print(f"\n{name}: {asdict(MODELS[name])}")
        print(tabulate([display(row) for row in table if row["model"] == name], headers="keys",
                       floatfmt=".2f", tablefmt=args.tablefmt))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump({"schema": "lors_fx.dist_memory/1", "args": vars(args), "unit": "GiB",
                       "models": {m: asdict(MODELS[m]) for m in models}, "rows": table},
                      handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
