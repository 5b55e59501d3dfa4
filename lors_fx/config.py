"""LorsConfig: the one object a user builds to say what lors_fx should do.

A plain dataclass in the style of PEFT's ``LoraConfig`` (same field names where they overlap) and
torchao's ``quantize_(model, Config)``: validated on construction, serialisable to JSON.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

__all__ = ["LorsConfig", "CHECKPOINT_POLICIES", "parse_checkpoint_policy"]

GRAD_MODES = ("lors", "exact")
INIT_MODES = ("zeros", "gradient")
COMPILERS = ("auto", "eager", "inductor")
ADAPTER_DTYPES = ("float32", "weight")
CHECKPOINT_POLICIES = ("none", "block", "every:<k>", "budget:<bytes>")

_SIZE_SUFFIX = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20,
                "mib": 2**20, "g": 2**30, "gb": 2**30, "gib": 2**30}


def parse_checkpoint_policy(policy: str) -> tuple[str, int]:
    """Parse ``"none"|"block"|"every:k"|"budget:<bytes>"`` into ``(kind, value)``.

    ``budget`` accepts a byte count with an optional unit (``budget:512MiB``, ``budget:2e6``).
    Raises ``ValueError`` naming the field on anything else.
    """
    text = str(policy).strip().lower()
    if text in ("none", "block"):
        return text, 0
    kind, _, value = text.partition(":")
    if kind == "every":
        if value.isdigit() and int(value) >= 1:
            return "every", int(value)
    elif kind == "budget":
        match = re.fullmatch(r"([0-9.e+]+)\s*([a-z]*)", value)
        if match and match.group(2) in _SIZE_SUFFIX:
            try:
                number = float(match.group(1))
            except ValueError:
                number = -1.0
            if 0 <= number and math.isfinite(number * _SIZE_SUFFIX[match.group(2)]):
                return "budget", int(number * _SIZE_SUFFIX[match.group(2)])
    raise ValueError(f"LorsConfig.checkpoint: expected one of {CHECKPOINT_POLICIES} "
                     f"(k >= 1, bytes >= 0 with optional KiB/MiB/GiB), got {policy!r}")


@dataclass
class LorsConfig:
    """What to adapt and how.

    Attributes:
        r: adapter rank.
        lora_alpha: scale numerator; ``s = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``).
        target_modules: ``None`` = every sparse ``nn.Linear`` except ``exclude_modules``; a list of
            names matched against the end of each module's qualified name (``"q_proj"`` matches
            ``model.layers.0.self_attn.q_proj``), or one regex string matched against the whole
            name (PEFT's rules). An unknown name is an error.
        exclude_modules: name suffixes never adapted (``lm_head``: with tied embeddings, touching it
            touches ``embed_tokens``).
        lora_dropout: dropout on the adapter's input; > 0 uses the two-product form
            ``y = x W^T + s drop(x) ((B A) * M)^T`` (one more dense matmul in forward and backward).
        use_rslora: rank-stabilised scale ``lora_alpha / sqrt(r)``.
        grad_mode: ``"lors"`` (factorized, straight-through; the paper) or ``"exact"``.
        recompute: rebuild ``W'`` in backward (``False`` keeps it: an ablation).
        chunk_bytes: bound on the exact backward's dense transient (None = 64 MiB).
        init: ``"zeros"`` (PEFT's default: lora_A Kaiming-uniform, lora_B = 0) or ``"gradient"``
            (LoRS: lora_A = top-r right singular vectors of the averaged weight gradient, lora_B = 0;
            needs data, see :func:`lors_fx.gradient_init`).
        init_samples: examples averaged by the gradient init.
        init_mask_gradient: mask the averaged gradient with ``M`` before the SVD.
        min_sparsity: a linear is "sparse" (a target) when at least this fraction of its weight is 0.
        checkpoint: activation-checkpoint policy of the compiled path: ``"none"``, ``"block"``,
            ``"every:k"`` or ``"budget:<bytes>"``.
        convert_peft: PEFT LoRA layers on sparse bases become the masked LoRS form. ``None``
            (default) = on: :func:`lors_fx.optimize` converts a PEFT model's layers in place, and
            the ``lors`` backend's ``convert_peft_lora`` pass rewrites PEFT's sum in a graph;
            ``False`` turns the pass off, and ``optimize`` refuses a PEFT model.
        fw_compiler / bw_compiler: what runs the compiled path's partitioned graphs: ``"auto"``
            (default: inductor where it can run, i.e. a C++ compiler on CPU or triton on CUDA,
            else the eager GraphModules, with the reason in :func:`lors_fx.report`; the
            environment variable ``LORS_FX_COMPILER=eager|inductor`` overrides it), ``"eager"``
            or ``"inductor"``.
        adapter_dtype: ``"float32"`` (default): float32 adapters on a float16/bfloat16 base (as
            PEFT's ``autocast_adapter_dtype``: half-precision adapters lose small AdamW updates and
            overflow), the weight's dtype on a float32/float64 base; ``"weight"``: always the
            weight's dtype. The op casts adapters to the weight's dtype for the math.
        semi_structured: run each layer's forward ``x @ W'.T`` on PyTorch's 2:4 kernels
            (:func:`lors_fx.semi_structured.semi_structured_lora_linear`) where they can run: CUDA
            with compute capability >= 8.0, float16/bfloat16, an exact 2:4 base, dims multiples of
            16; other layers run the op as usual and are named in a warning with the reason.
            Eager path only (``optimize(..., compile=False)``); needs ``grad_mode="lors"``,
            ``recompute=True``, no dropout. The backward's ``g @ W'`` stays dense.
        quant_aware: on a quantized base (:class:`lors_fx.quantized.QuantizedLinear`), train
            through ``Q(W')`` on the base's grid (fake-quantized, straight-through gradient), so
            the merged quantized model computes exactly what was trained (SQFT's QA idea).
            Has no effect on float bases; needs ``lora_dropout=0``.
        fuse_build: on the compiled path, for each graph inductor compiles, lower the op's ``W'``
            build (forward and the backward's rebuild) into aten ops after the partitioner
            (``lors_fx.passes.lower_lors_ops``): inductor fuses it into one pass over the weight
            and the op's Python dispatch goes away; what is saved for backward is unchanged
            (``x``). ``True`` (default); ``False`` keeps the op opaque (the ablation).
    """

    r: int = 16
    lora_alpha: float = 32.0
    target_modules: Optional[Union[Sequence[str], str]] = None
    exclude_modules: Sequence[str] = ("lm_head",)
    lora_dropout: float = 0.0
    use_rslora: bool = False
    grad_mode: str = "lors"
    recompute: bool = True
    chunk_bytes: Optional[int] = None
    init: str = "zeros"
    init_samples: int = 64
    init_mask_gradient: bool = False
    min_sparsity: float = 0.25
    checkpoint: str = "none"
    convert_peft: Optional[bool] = None
    fw_compiler: str = "auto"
    bw_compiler: str = "auto"
    adapter_dtype: str = "float32"
    semi_structured: bool = False
    quant_aware: bool = False
    fuse_build: bool = True

    def __post_init__(self):
        def fail(name, message):
            raise ValueError(f"LorsConfig.{name}: {message}")

        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            fail("r", f"must be a positive int, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool) \
                or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            fail("lora_alpha", f"must be a finite number > 0, got {self.lora_alpha!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                try:
                    re.compile(self.target_modules)
                except re.error as error:
                    fail("target_modules", f"not a valid regex ({error})")
            else:
                names = list(self.target_modules)
                if not names or not all(isinstance(n, str) and n for n in names):
                    fail("target_modules", f"must be None, a regex string or a non-empty list "
                         f"of module names, got {self.target_modules!r}")
                self.target_modules = names
        if isinstance(self.exclude_modules, str):
            self.exclude_modules = [self.exclude_modules]
        self.exclude_modules = list(self.exclude_modules)
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            fail("lora_dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
        if self.grad_mode not in GRAD_MODES:
            fail("grad_mode", f"must be one of {GRAD_MODES}, got {self.grad_mode!r}")
        if self.init not in INIT_MODES:
            fail("init", f"must be one of {INIT_MODES}, got {self.init!r}")
        if self.chunk_bytes is not None and (not isinstance(self.chunk_bytes, int)
                                             or isinstance(self.chunk_bytes, bool)
                                             or self.chunk_bytes <= 0):
            fail("chunk_bytes", f"must be None or a positive int, got {self.chunk_bytes!r}")
        if not isinstance(self.init_samples, int) or isinstance(self.init_samples, bool) \
                or self.init_samples < 1:
            fail("init_samples", f"must be a positive int, got {self.init_samples!r}")
        if not (isinstance(self.min_sparsity, (int, float)) and 0.0 < self.min_sparsity < 1.0):
            fail("min_sparsity", f"must be in (0, 1), got {self.min_sparsity!r}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            fail("adapter_dtype", f"must be one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}")
        parse_checkpoint_policy(self.checkpoint)
        for name in ("fw_compiler", "bw_compiler"):
            if getattr(self, name) not in COMPILERS:
                fail(name, f"must be one of {COMPILERS}, got {getattr(self, name)!r}")
        for name in ("use_rslora", "recompute", "init_mask_gradient", "semi_structured",
                     "quant_aware", "fuse_build"):
            if not isinstance(getattr(self, name), bool):
                fail(name, f"must be a bool, got {getattr(self, name)!r}")
        if self.convert_peft is not None and not isinstance(self.convert_peft, bool):
            fail("convert_peft", f"must be None or a bool, got {self.convert_peft!r}")
        if self.semi_structured and (self.grad_mode != "lors" or not self.recompute
                                     or self.lora_dropout > 0):
            fail("semi_structured", "needs grad_mode='lors', recompute=True and lora_dropout=0 "
                 f"(got {self.grad_mode!r}, {self.recompute}, {self.lora_dropout})")

        if self.quant_aware and (self.lora_dropout > 0 or not self.recompute
                                 or self.semi_structured):
            fail("quant_aware", "needs lora_dropout=0, recompute=True and semi_structured=False "
                 f"(got {self.lora_dropout}, {self.recompute}, {self.semi_structured})")

    @property
    def scaling(self) -> float:
        """``s``: ``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self, path: Optional[str] = None) -> str:
        """Serialise to JSON (and write it to ``path`` when given)."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict) -> "LorsConfig":
        """Build from a dict; unknown keys are an error (they are usually typos), missing ones
        take their defaults (files written before a field existed still load)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"LorsConfig: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text_or_path: str) -> "LorsConfig":
        """Build from a JSON string or the path of a JSON file."""
        text = text_or_path
        if not text_or_path.lstrip().startswith("{"):
            with open(text_or_path, encoding="utf-8") as handle:
                text = handle.read()
        return cls.from_dict(json.loads(text))
