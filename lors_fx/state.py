"""The one object lors_fx attaches to a model, and its one accessor.

:func:`lors_fx.optimize` (through :func:`lors_fx.adapters.attach_adapters`) stores a
:class:`LorsState` on the model; merge, save, init, report and the compiler read it with
:func:`state_of`. It holds the :class:`~lors_fx.LorsConfig`, the ``requires_grad`` flags the model
had before the adapters were attached (restored by merge and remove), and, once the model is
compiled, the compiler's record (:class:`lors_fx.compiler.state.LorsCompileState`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from torch import nn

from lors_fx.config import LorsConfig

__all__ = ["LorsState", "state_of", "set_state", "clear_state"]

# The instance attribute; stored in ``__dict__`` directly so nn.Module's __setattr__ does not
# treat it as a submodule or parameter, and so deep copies carry it.
_ATTRIBUTE = "_lors_state"


@dataclass
class LorsState:
    """What lors_fx knows about one model."""

    config: LorsConfig = field(default_factory=LorsConfig)
    #: ``{parameter name: requires_grad}`` before the adapters froze the base.
    requires_grad: Dict[str, bool] = field(default_factory=dict)
    #: the compiler's record (a ``LorsCompileState``) once the model is compiled.
    compiled: Optional[Any] = None


def state_of(model: nn.Module) -> Optional[LorsState]:
    """The model's :class:`LorsState`, or None for a model lors_fx has not touched."""
    return model.__dict__.get(_ATTRIBUTE)


def set_state(model: nn.Module, state: LorsState) -> LorsState:
    """Attach ``state`` to ``model`` (replacing any previous one); returns it."""
    model.__dict__[_ATTRIBUTE] = state
    return state


def clear_state(model: nn.Module) -> None:
    """Remove the model's state (after merge or remove_adapters)."""
    model.__dict__.pop(_ATTRIBUTE, None)
