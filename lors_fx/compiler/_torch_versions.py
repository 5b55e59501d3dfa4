"""Which torch versions lors_fx is tested with, and what differs between them.

Tested: torch **2.11 to 2.14** (``pyproject.toml`` pins ``torch>=2.11,<2.15``; CI runs the
README's test command on 2.13 and the op, pass, compiler and merge tests on 2.11 and 2.14, see
``tools/ci_torch_matrix.sh``). Importing ``lors_fx.compiler._torch_private`` warns once outside
that range: the compiled path relies on private torch names that a new torch may move.

The differences found in that range, each handled in one function of ``_torch_private.py``
(which asks :func:`torch_at_least` here, so a version test is never spread over the package):

- **2.11** has no ``node.meta["autograd_backward"]`` on the nodes aot_autograd traces while it
  runs the backward (added in 2.12). aot_autograd's ``meta["partitioner_tag"] == "is_backward"``
  marks the same nodes on every version in the range (``is_backward_traced``). Without it the
  joint-graph passes took backward nodes that read no tangent (a weight's transpose, a recomputed
  activation) for forward nodes, and ``checkpoint="block"`` saved each block's internals.
- **2.11**'s dynamo writes every compile's config as JSON, the ``ignore_logging_functions`` set
  included and sorted (2.12 leaves that set out). A function neither sorts nor serialises, so
  each compile logged a ``TypeError`` traceback ("Unexpected exception logging compilation
  metrics"). On 2.11 ``ignore_logging_function`` adds a :class:`LoggingFunctionKey` instead: a
  string that dynamo 2.11's ``logger.<method>`` check (``function in ignore_set``) takes for the
  function, and that sorts and serialises.
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Optional, Tuple

import torch

__all__ = ["TESTED_TORCH", "TORCH_VERSION", "parse_torch_version", "torch_at_least",
           "is_tested_torch", "check_torch_version", "LoggingFunctionKey"]

#: The first and last torch minor versions lors_fx is tested with (both included).
TESTED_TORCH: Tuple[Tuple[int, int], Tuple[int, int]] = ((2, 11), (2, 14))

_VERSION = re.compile(r"^\s*(\d+)\.(\d+)")


def parse_torch_version(text: str) -> Optional[Tuple[int, int]]:
    """``"2.11.0+cu130"`` -> ``(2, 11)``; None when ``text`` does not start with major.minor."""
    match = _VERSION.match(str(text))
    return (int(match.group(1)), int(match.group(2))) if match else None


#: ``(major, minor)`` of the installed torch (None: a version string that does not parse).
TORCH_VERSION = parse_torch_version(torch.__version__)


def torch_at_least(version: Tuple[int, int]) -> bool:
    """True when the installed torch is ``version`` or newer (an unparsable one counts as new)."""
    return TORCH_VERSION is None or TORCH_VERSION >= tuple(version)


def is_tested_torch(version: Optional[Tuple[int, int]]) -> bool:
    """True for a ``(major, minor)`` inside :data:`TESTED_TORCH`."""
    first, last = TESTED_TORCH
    return version is not None and first <= tuple(version) <= last


def check_torch_version(version_text: str = torch.__version__) -> Optional[str]:
    """Warn (``RuntimeWarning``) when ``version_text`` is outside the tested range; return the
    message, or None when it is inside."""
    if is_tested_torch(parse_torch_version(version_text)):
        return None
    (first_major, first_minor), (last_major, last_minor) = TESTED_TORCH
    message = (f"lors_fx is tested with torch {first_major}.{first_minor} to "
               f"{last_major}.{last_minor}, found {version_text}: the compiled path uses private "
               "torch APIs (lors_fx/compiler/_torch_private.py) that may have changed")
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return message


class LoggingFunctionKey(str):
    """``function``'s dotted name, equal to (and hashed as) ``function`` itself.

    For torch 2.11's ``ignore_logging_functions`` only (see the module docstring): set membership
    of ``function`` finds the key, while sorting and ``json.dumps`` see a plain string.
    """

    function: Callable

    def __new__(cls, function: Callable) -> "LoggingFunctionKey":
        name = f"{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', '')}"
        key = super().__new__(cls, name)
        key.function = function
        return key

    def __hash__(self) -> int:
        return hash(self.function)

    def __eq__(self, other: Any) -> bool:
        return other is self.function or (isinstance(other, LoggingFunctionKey)
                                          and other.function is self.function)

    def __ne__(self, other: Any) -> bool:
        return not self.__eq__(other)
