"""Graph code a person can read, for ``lors-fx inspect --show graph/diff``.

FX prints a dynamo graph with dynamo's names for the model's tensors
(``l_args_0_modules_model_modules_layers_modules_0_..._parameters_weight_``), a
``# File: ...`` comment per source line, and ``;  x = None`` after each statement (codegen
freeing memory early). :func:`display_code` prints a copy of the graph with:

- module paths instead of those names (``model.layers.0.self_attn.q_proj.weight``, read from
  the names themselves and checked against the model's parameters and buffers);
- on each lors op node (``sparse_lora_linear`` or ``quant_lora_linear``), the comment of the
  model line that called the adapted module: the node inherits the stack trace of the
  ``F.linear`` it replaced (``ops.py ... in reference_sparse_lora_linear``), which no longer
  describes it;
- no ``= None`` tails, and file paths from the package on (``transformers/models/...``,
  ``lors_fx/ops.py``).

The result is for reading (a dotted name is not an identifier); :func:`readable_code` gives the
plain ``print_readable`` text. :func:`diff_header` says what a diff shows and what was rewritten;
:class:`CaptureBefore` (a forward pass doing nothing) keeps the dynamo graph as captured, the
"before" side of the diffs and of the DOT region.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from torch import fx, nn

from lors_fx.passes._match import copy_graph_module, is_lors_op
from lors_fx.passes._quant_patterns import is_quant_lors_op
from lors_fx.passes.manager import PassContext, PassResult

__all__ = ["readable_code", "unified_diff", "readable_names", "display_code", "site_groups",
           "diff_header", "CaptureBefore", "CAPTURE_PASS_NAME"]

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # lors_fx/
#: frames inside lors_fx a lors op's stack trace loses (the models of lors_fx.testing stay)
_OWN_FRAMES = (str(_PACKAGE_DIR) + "/", str(_PACKAGE_DIR / "testing") + "/")
#: separators dynamo puts between the parts of a module attribute's source name
_SOURCE_PARTS = re.compile(r"_(?:modules|parameters|buffers)_")
_FRAME = re.compile(r'^\s*File "(.+)", line \d+, in .+$')
_DELETE_TAIL = re.compile(r";  [\w.]+(?: = [\w.]+)* = None$")
_SITE_PACKAGES = re.compile(r"(# File: )\S*/site-packages/")
_CHECKOUT = f"# File: {_PACKAGE_DIR.parent}/"  # lors_fx's own files: from the package on


def readable_code(gm: Optional[fx.GraphModule]) -> str:
    """The GraphModule's Python code with each value's dtype and shape as an annotation."""
    if gm is None:
        return "# (no graph)\n"
    try:
        return gm.print_readable(print_output=False, include_stride=False, include_device=False,
                                 colored=False)
    except TypeError:  # older signatures
        return gm.print_readable(print_output=False)


def unified_diff(before: str, after: str, before_name: str, after_name: str) -> str:
    """A unified diff of two code listings (3 lines of context)."""
    lines = difflib.unified_diff(before.splitlines(keepends=True),
                                 after.splitlines(keepends=True), before_name, after_name, n=3)
    text = "".join(lines)
    return text if text else f"# no difference between {before_name} and {after_name}\n"


def readable_names(gm: fx.GraphModule, model: Optional[nn.Module] = None) -> Dict[str, str]:
    """``{placeholder name: readable name}`` for the graph's inputs that dynamo named after
    their source: a model attribute becomes its path (``model.layers.0.mlp.up_proj.lora_A``,
    spelled as the model spells it when ``model`` is given: dynamo lowercases), a keyword
    argument its name (``input_ids``). Other placeholders are left out."""
    known: Dict[str, str] = {}
    if model is not None:
        for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
            known.setdefault(name.lower(), name)
    taken = {node.name for node in gm.graph.nodes}
    names = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        stem = node.name[:-1] if node.name.endswith("_") else node.name
        parts = _SOURCE_PARTS.split(stem)
        if len(parts) > 1:
            dotted = ".".join(parts[1:])
            names[node.name] = known.get(dotted.lower(), dotted)
        elif stem.startswith("l_kwargs_") and stem[len("l_kwargs_"):] not in taken:
            names[node.name] = stem[len("l_kwargs_"):]
    return names


def _caller_trace(stack_trace: Optional[str]) -> Optional[str]:
    """``stack_trace`` without its innermost frames inside lors_fx: what is left ends at the
    model's call of the adapted module."""
    if not stack_trace:
        return stack_trace
    lines = stack_trace.rstrip("\n").split("\n")
    starts = [i for i, line in enumerate(lines) if _FRAME.match(line)]
    keep = len(lines)
    for start in reversed(starts):
        path = _FRAME.match(lines[start]).group(1)
        if not path.startswith(_OWN_FRAMES[0]) or path.startswith(_OWN_FRAMES[1]):
            break
        keep = start
    return "\n".join(lines[:keep]) + "\n" if keep else None


def display_code(gm: Optional[fx.GraphModule], names: Optional[Dict[str, str]] = None) -> str:
    """:func:`readable_code` of a copy of ``gm`` made for reading (module docstring): lors op
    nodes commented with the model line that called them, ``names`` substituted, no
    ``= None`` tails, short site-packages paths."""
    if gm is None:
        return readable_code(None)
    copy = copy_graph_module(gm)
    for node in copy.graph.nodes:
        if (is_lors_op(node) or is_quant_lors_op(node)) and node.meta.get("stack_trace"):
            node.meta["stack_trace"] = _caller_trace(node.meta["stack_trace"])
    code = readable_code(copy)
    if names:
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(names, key=len,
                                                                     reverse=True))) + r")\b")
        code = pattern.sub(lambda match: names[match.group(1)], code)
    lines = [_SITE_PACKAGES.sub(r"\1", _DELETE_TAIL.sub("", line)) for line in code.split("\n")]
    return "\n".join(line.replace(_CHECKOUT, "# File: ") for line in lines)


def site_groups(fqns: List[str]) -> List[str]:
    """Module paths grouped over their first number (the layer): ``model.layers.[0-31].mlp.up_proj``
    for 32 of them; paths without a number stay as they are. Order of first appearance."""
    groups: Dict[str, List[int]] = {}
    for fqn in fqns:
        match = re.search(r"\.(\d+)\.", fqn)
        key = fqn if match is None else fqn[:match.start()] + ".{}." + fqn[match.end():]
        groups.setdefault(key, []).append(-1 if match is None else int(match.group(1)))
    out = []
    for key, layers in groups.items():
        if layers == [-1]:
            out.append(key)
            continue
        layers = sorted(set(layers))
        contiguous = layers == list(range(layers[0], layers[-1] + 1))
        span = (f"[{layers[0]}-{layers[-1]}]" if contiguous and len(layers) > 1 else
                str(layers[0]) if len(layers) == 1 else "[" + ",".join(map(str, layers)) + "]")
        out.append(key.replace("{}", span, 1))
    return out


def diff_header(data: Dict[str, Any], graph: str) -> str:
    """Comment lines above ``--show diff``: what the two sides are, the passes that changed the
    graph, and the sites rewritten (and not rewritten) to the lors op."""
    if graph == "forward":
        lines = ["# forward diff: the dynamo graph before (-) and after (+) the LoRS passes",
                 "# names: module paths for dynamo's placeholders; '= None' tails dropped"]
    else:
        lines = ["# backward diff: the naive masked form's backward (-, compiled again without",
                 "# the rewrite) and the emitted LoRS backward (+): the naive one reads W' (and",
                 "# the mask) saved by the forward, the LoRS op rebuilds W' in its backward"]
    for p in data.get("passes") or []:
        if p["count"] or p["nodes_created"] or p["nodes_erased"]:
            lines.append(f"# pass {p['name']} (graph {p['graph']}): matched {p['count']}, "
                         f"+{p['nodes_created']}/-{p['nodes_erased']} nodes")
    sites = data.get("sites") or []
    done = [s["fqn"] for s in sites if s["rewritten"]]
    quantized = [s for s in sites if s.get("bits") is not None]
    if len(quantized) < len(sites) or not sites:
        lines.append(f"# rewritten: {len(done)} of {len(sites)} sites: mask, B@A, scale, W' and "
                     f"F.linear -> one torch.ops.lors.sparse_lora_linear call each")
    if quantized:
        lines.append(f"# quantized sites: lors.dequantize, mask, B@A, scale, W' and F.linear -> "
                     f"one torch.ops.lors.quant_lora_linear call each "
                     f"({sum(bool(s['rewritten']) for s in quantized)} of {len(quantized)})")
    lines += [f"#   {group}" for group in site_groups(done)]
    missed = [s["fqn"] for s in sites if s["rewritten"] is False]
    if missed:
        lines.append(f"# not rewritten ({len(missed)}): " + ", ".join(site_groups(missed)))
    return "\n".join(lines)


CAPTURE_PASS_NAME = "capture_before"


class CaptureBefore:
    """A forward pass that records a copy of the dynamo graph and changes nothing.

    Put right after ``annotate_sparse_linears`` (which only adds ``node.meta["lors_site"]``) and
    before the rewrite, it keeps the graph as dynamo captured it, sites annotated: the "before"
    of ``--show diff`` and ``--dot``. One copy per compiled graph, in compile order.
    """

    __name__ = CAPTURE_PASS_NAME

    def __init__(self):
        self.graphs: List[fx.GraphModule] = []

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        self.graphs.append(copy_graph_module(gm))
        return PassResult(CAPTURE_PASS_NAME, 0)
