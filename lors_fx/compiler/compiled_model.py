"""``compile_model``: install the lors backend on a model's forward, with an eager fallback.

- Every adapter module emits the naive form (``emit_reference=True``), which the backend's passes
  rewrite into the lors op; HF models get ``config.use_cache = False`` (restored by
  :func:`decompile_model`).
- The bound ``forward`` is compiled and installed as an instance attribute, so ``model(...)``,
  training loops and the HF Trainer use it, while ``state_dict()`` keys do not change (no
  ``_orig_mod.`` wrapper) and the forward's signature is kept (the Trainer inspects it).
- Calls with gradients disabled (evaluation, ``generate()``) run the eager path: the adapters call
  the lors op directly. It is exact, saves nothing, and avoids a recompile per generation length;
  the compiled path is for training steps. So do calls inside a ``TorchDispatchMode`` (e.g.
  ``FlopCounterMode``): dynamo would skip the frame for good and the model would stay eager.
- If dynamo cannot capture the forward (a compile error, an empty capture, or, with
  ``fallback_on_graph_break``, any graph break on a call) the model falls back to the eager op
  path for good, with a warning that says why: code outside a graph would run the naive form,
  which saves ``W'``. The call that found the graph break has already run correctly; a call whose
  compile failed is rerun eagerly (if that fails too, its error is raised and nothing changes).
- A deep copy of the compiled model runs eagerly (compile the copy to compile it).
"""
from __future__ import annotations

import contextlib
import functools
import types
import warnings
import weakref
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from lors_fx._collectives import is_sharded
from lors_fx.adapters import lors_modules
from lors_fx.compiler import _torch_private as private
from lors_fx.compiler.backend import backend
from lors_fx.compiler.blocks import decoder_blocks, inside
from lors_fx.compiler.compilers import resolve_compiler
from lors_fx.compiler.loss import install_compiled_loss, remove_compiled_loss
from lors_fx.compiler.state import LorsCompileState, compile_state_of, is_compiled
from lors_fx.config import LorsConfig, parse_checkpoint_policy
from lors_fx.state import LorsState, set_state, state_of

__all__ = ["compile_model", "decompile_model"]


@contextlib.contextmanager
def _eager_adapters(modules: Sequence[nn.Module]):
    """Adapters call the lors op directly (the eager path) for the duration."""
    previous = [m.emit_reference for m in modules]
    for m in modules:
        m.emit_reference = False
    try:
        yield
    finally:
        for m, value in zip(modules, previous):
            m.emit_reference = value


class _CompiledForward:
    """The forward :func:`compile_model` installs on the model (an instance attribute).

    Routes each call: gradients disabled or fallen back -> the eager op path; otherwise the
    compiled forward, watching for compile errors and graph breaks. A deep copy of the model gets
    an eager forward (:class:`_EagerForward`) bound to the copy, never this object.
    """

    def __init__(self, model: nn.Module, state: LorsCompileState, compiled: Callable,
                 modules: List[nn.Module], fallback_on_graph_break: bool,
                 original: Callable):
        self.model_id = id(model)
        self.state, self.compiled, self.modules = state, compiled, modules
        self.fallback_on_graph_break = fallback_on_graph_break
        self.original = original
        self.rescope = None  # (weakref to the model, compile_model kwargs): see __call__
        functools.update_wrapper(self, original)  # keeps the signature (Trainer)

    def fall_back(self, reason: str) -> None:
        self.state.fallback = reason
        for m in self.modules:
            m.emit_reference = False
        warnings.warn(f"lors_fx: the model runs the eager LoRS op path: {reason}",
                      RuntimeWarning, stacklevel=3)

    def __call__(self, *args, **kwargs):
        state, original = self.state, self.original
        if self.rescope is not None and not state.graphs and state.fallback is None:
            # Compiled whole (scope "auto"), then sharded by FSDP2 before the first training
            # step (e.g. by accelerate's prepare): compile each block instead, so FSDP2's hooks
            # run between graphs rather than breaking one.
            model, options = self.rescope[0](), self.rescope[1]
            if model is not None and torch.is_grad_enabled() and is_sharded(model):
                self.rescope = None
                try:
                    compile_model(model, state.config, scope="blocks", **options)
                except (ValueError, TypeError) as error:
                    self.fall_back(f"the model was sharded after compile_model and cannot be "
                                   f"compiled per block: {error}")
                    with _eager_adapters(self.modules):
                        return original(*args, **kwargs)
                return model.forward(*args, **kwargs)
        if state.fallback is not None or not torch.is_grad_enabled() \
                or private.dispatch_mode_active():
            with _eager_adapters(self.modules):
                return original(*args, **kwargs)
        breaks_before = private.graph_break_count()
        reasons_before = private.graph_break_reasons()
        failure = None
        try:
            with private.specialize_floats():
                output = self.compiled(*args, **kwargs)
        except private.dynamo_error_types() as error:
            failure = _describe_error(error)
        if failure is not None:  # outside the except: a user error is raised without the chain
            with _eager_adapters(self.modules):
                output = original(*args, **kwargs)  # a user error raises here, nothing changed
            self.fall_back(f"dynamo could not compile the forward ({failure})")
            return output
        if not state.graphs:
            self.fall_back("dynamo compiled no graph for the forward (skipped frame, or its "
                           "recompile limit reached)")
            return output
        breaks = private.graph_break_count() - breaks_before
        if breaks:
            state.graph_breaks += breaks
            new_reasons = []
            for reason, count in private.graph_break_reasons().items():
                short = (str(reason).strip().splitlines() or [""])[0][:300]
                new = count - reasons_before.get(reason, 0)
                if new:
                    state.graph_break_reasons[short] = state.graph_break_reasons.get(short, 0) + new
                    new_reasons.append(short)
            if self.fallback_on_graph_break:
                self.fall_back(f"{breaks} graph break(s) in the compiled forward; code outside "
                               f"the graphs would save W' (first: {new_reasons[0]})")
        return output

    def __deepcopy__(self, memo):
        copy = memo.get(self.model_id)
        return _EagerForward(copy) if copy is not None else None


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


def _describe_error(error: BaseException) -> str:
    """The error and, for a failing backend, what failed inside it."""
    cause = getattr(error, "inner_exception", None) or error.__cause__
    text = _first_line(error)
    return text if cause is None else f"{text} caused by {_first_line(cause)}"


class _EagerForward:
    """The forward of a deep copy of a compiled model: the class forward, eager op path."""

    def __init__(self, model: nn.Module):
        self.model = model
        functools.update_wrapper(self, type(model).forward)

    def __call__(self, *args, **kwargs):
        with _eager_adapters(list(lors_modules(self.model).values())):
            return type(self.model).forward(self.model, *args, **kwargs)


def _compile_roots(model: nn.Module, scope: str, config: LorsConfig) -> List[nn.Module]:
    """The modules whose forward gets compiled: ``[model]``, or its decoder blocks; validated
    (nothing is changed here)."""
    if scope not in ("auto", "model", "blocks"):
        raise ValueError(f"compile_model: scope must be 'auto', 'model' or 'blocks', got "
                         f"{scope!r}")
    if scope == "auto":
        scope = "blocks" if is_sharded(model) or _regional(model, config) else "model"
    if scope == "model":
        return [model]
    blocks = decoder_blocks(model)
    outside = [n for n in lors_modules(model) if not any(inside(n, b) for b, _ in blocks)]
    if outside:
        raise ValueError(f"compile_model(scope='blocks'): adapted modules outside the decoder "
                         f"blocks would run uncompiled: {outside[:4]}")
    kind = parse_checkpoint_policy(config.checkpoint)[0]
    if kind not in ("none", "block"):
        raise ValueError(f"compile_model(scope='blocks'): checkpoint={config.checkpoint!r} needs "
                         f"the whole model in one graph; per block only 'none' or 'block' apply")
    for name, block in blocks:
        own = block.__dict__.get("forward")
        if own is not None and not isinstance(own, (_CompiledForward, _EagerForward)):
            raise TypeError(f"compile_model(scope='blocks'): block {name} has its own forward "
                            f"attribute ({type(own).__name__}, e.g. a hook wrapper); compile "
                            f"before adding it")
        if not isinstance(getattr(type(block), "forward", None), types.FunctionType):
            raise TypeError(f"compile_model(scope='blocks'): {type(block).__name__}.forward is "
                            f"not a plain method")
    return [block for _, block in blocks]


def _regional(model: nn.Module, config: LorsConfig) -> bool:
    """``scope="auto"`` compiles block by block when inductor compiles the graphs: blocks of one
    class share one compiled graph, so the compile time is one block's, not the model's (30x less
    on SmolLM2-135M); it needs decoder blocks holding every adapter and a per-block checkpoint
    policy. With the eager compilers a whole-model graph costs little, and stays."""
    if not _uses_inductor(model, config):
        return False
    if parse_checkpoint_policy(config.checkpoint)[0] not in ("none", "block"):
        return False
    try:
        blocks = decoder_blocks(model)
    except ValueError:
        return False
    names = [name for name, _ in blocks]
    return len(blocks) > 1 and all(any(inside(n, b) for b in names) for n in lors_modules(model))


def _uses_inductor(model: nn.Module, config: LorsConfig) -> bool:
    """True when ``config``'s compilers resolve to inductor for the model's device."""
    params = next(iter(model.parameters()), None)
    device = params.device.type if params is not None else "cpu"
    return "inductor" in (resolve_compiler(config.fw_compiler, device)[0],
                          resolve_compiler(config.bw_compiler, device)[0])


def _install_block_forwards(model: nn.Module, roots: List[nn.Module], state: LorsCompileState,
                            backend_fn: Callable, dynamic, modules: List[nn.Module],
                            fallback_on_graph_break: bool) -> None:
    """Compile each block's class forward once (blocks of one class share the compiled code:
    dynamo lifts their parameters to graph inputs) and install it on every block; with inductor
    also the HF loss (:mod:`lors_fx.compiler.loss`)."""
    compiled_by_function: Dict[Callable, Callable] = {}
    for block in roots:
        function = type(block).forward
        compiled = compiled_by_function.get(function)
        if compiled is None:
            compiled = torch.compile(private.clone_function(function), dynamic=dynamic,
                                     backend=backend_fn)
            compiled_by_function[function] = compiled
        block.forward = _CompiledForward(block, state, functools.partial(compiled, block),
                                         modules, fallback_on_graph_break,
                                         types.MethodType(function, block))
    state.compiled_roots = list(roots)
    if _uses_inductor(model, state.config):
        install_compiled_loss(model, state, dynamic)


def _ignore_transformers_logging() -> None:
    """Let dynamo skip transformers' ``logger.warning_once`` / ``warning_advice`` instead of
    breaking the graph on them (GPT-2's loss warns through it on every traced call). Global and
    idempotent; those messages are then not printed from inside compiled code."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    for name in ("warning_once", "warning_advice"):
        function = getattr(hf_logging, name, None)
        if function is not None:
            private.ignore_logging_function(function)


def compile_model(model: nn.Module, config: Optional[LorsConfig] = None, *, dynamic=None,
                  report_before: bool = True, passes: Optional[Sequence[Callable]] = None,
                  fallback_on_graph_break: bool = True, scope: str = "auto") -> nn.Module:
    """Compile ``model``'s forward with the lors backend, in place; returns ``model``.

    The adapters emit the naive form for the passes to rewrite into the op; the compiled forward
    is installed as an instance attribute (same signature, same ``state_dict`` keys); calls
    without gradients and deep copies run the eager op; a graph break or compile error falls
    back to the eager op for good, with a warning that says why (module docstring).

    Args:
        model: a model with LoRS adapters (:func:`lors_fx.attach_adapters`).
        config: the :class:`LorsConfig` (default: the model's, else ``LorsConfig()``).
        dynamic: passed to ``torch.compile`` (None: dynamic shapes after a recompile).
        report_before: measure what the un-rewritten graphs would save (one side trace each).
        passes: forward passes instead of the default ones.
        fallback_on_graph_break: see above; ``False`` keeps the partly compiled forward.
        scope: ``"model"`` compiles the model's forward; ``"blocks"`` compiles each decoder block
            (:func:`lors_fx.distributed.decoder_blocks`) instead, so hooks between blocks (FSDP2's
            all-gather and reshard) run outside the graphs; ``"auto"`` = ``"blocks"`` for a model
            sharded with FSDP2 or compiled with inductor (regional compilation: one block's
            compile time instead of the model's; the HF loss is then compiled on its own,
            :mod:`lors_fx.compiler.loss`), else ``"model"`` — and if FSDP2 shards the model after this call
            but before its first training step (accelerate's ``prepare``), that step switches to
            ``"blocks"``.

    Everything is recorded in :func:`lors_fx.state_of` ``(model).compiled`` (see
    :func:`lors_fx.report`).
    """
    model_state = state_of(model)
    if config is None:
        config = model_state.config if model_state is not None else LorsConfig()
    roots = _compile_roots(model, scope, config)  # validates before anything changes
    if is_compiled(model):
        decompile_model(model)
    modules = list(lors_modules(model).values())
    state = LorsCompileState(config=config, original_forward=model.forward)
    _ignore_transformers_logging()
    backend_fn = backend(config, model=model, passes=passes, report_before=report_before,
                         state=state, graph_is_block=roots != [model])
    if roots == [model]:
        compiled = torch.compile(private.fresh_entry_point(state.original_forward), dynamic=dynamic,
                                 backend=backend_fn)
        forward = _CompiledForward(model, state, compiled, modules, fallback_on_graph_break,
                                   state.original_forward)
        if scope == "auto":
            forward.rescope = (weakref.ref(model), dict(
                dynamic=dynamic, report_before=report_before, passes=passes,
                fallback_on_graph_break=fallback_on_graph_break))
    else:
        forward = None
        _install_block_forwards(model, roots, state, backend_fn, dynamic, modules,
                                fallback_on_graph_break)
    for m in modules:
        m.emit_reference = True
    _record(model, model_state, state)
    if forward is not None:
        model.forward = forward
    return model


def _record(model: nn.Module, model_state: Optional[LorsState], state: LorsCompileState) -> None:
    """Keep ``state`` in the model's state and turn the HF KV cache off (restored by decompile)."""
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "use_cache"):
        # The KV cache is an inference structure, not for training.
        state.use_cache = hf_config.use_cache
        hf_config.use_cache = False
    if model_state is None:  # a model compiled without lors_fx adapters (e.g. PEFT's)
        model_state = set_state(model, LorsState(config=state.config))
    model_state.compiled = state


def decompile_model(model: nn.Module) -> nn.Module:
    """Undo :func:`compile_model`: the original forward and the eager op path (state kept)."""
    for module in model.modules():  # the model, compiled blocks, and a deep copy's blocks
        if isinstance(module.__dict__.get("forward"), (_CompiledForward, _EagerForward)):
            del module.__dict__["forward"]
    for m in lors_modules(model).values():
        m.emit_reference = False
    remove_compiled_loss(model)
    state = compile_state_of(model)
    if state is not None:
        hf_config = getattr(model, "config", None)
        if state.use_cache is not None and hf_config is not None:
            hf_config.use_cache = state.use_cache
            state.use_cache = None
        state.compiled_roots = []
        state.original_forward = None
    return model
