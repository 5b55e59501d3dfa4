"""The package's architecture, enforced: layers point down, no cycles, private torch in one module.

Layers, lowest first (README "Layout"); a module may import its own layer and the ones below:

    leaves < core < compiler (+ passes) < distributed < api < methods < workflows < testing
    < bench < cli

Imports are read from the source (module level and inside functions alike), so an import hidden
in a function to dodge a cycle is seen too.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]

#: (layer, module prefixes), lowest first. ``lors_fx`` itself (the package root) re-exports the
#: API, so it sits in the api layer.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("leaves", ("lors_fx._version", "lors_fx.config", "lors_fx.ops", "lors_fx._nn",
                "lors_fx._collectives", "lors_fx.semi_structured", "lors_fx.quant",
                "lors_fx.quant_ops")),
    ("core", ("lors_fx.state", "lors_fx.sparsity", "lors_fx.quantized", "lors_fx.targets",
              "lors_fx.adapter_layers", "lors_fx.adapters", "lors_fx.quant_checkpoint",
              "lors_fx.peft_adapters", "lors_fx.init",
              "lors_fx.serialization")),
    ("compiler", ("lors_fx.compiler", "lors_fx.passes")),
    ("distributed", ("lors_fx.distributed", "lors_fx.deepspeed_engine")),
    ("api", ("lors_fx.api", "lors_fx")),
    ("methods", ("lors_fx.methods",)),
    ("workflows", ("lors_fx.workflows",)),
    ("testing", ("lors_fx.testing",)),
    ("bench", ("lors_fx.bench",)),
    ("cli", ("lors_fx.cli",)),
]

#: Third-party packages a function may import lazily, and why (everything else: at the top).
LAZY_IMPORTS = {
    # optional dependencies: the package works without them
    "deepspeed": "optional", "lm_eval": "optional", "matplotlib": "optional",
    "accelerate": "optional", "peft": "optional", "compressed_tensors": "optional", "datasets": "optional", "gguf": "optional",
    # torch's private and version-specific names stay inside the function that uses them, so a
    # torch that moved one fails there, not at import (lors_fx/compiler/_torch_private.py)
    "torch": "private and distributed submodules, loaded where used",
    # `import lors_fx` must not pay for transformers (seconds) when only the op is used
    "transformers": "heavy import, only the workflows and test models need it",
    "safetensors": "only the adapter files need it",
    "tqdm": "only progress bars need it",
    "tabulate": "only printed tables need it",
}

#: Allowed ``torch._*`` names outside ``_torch_private.py``, with the reason.
PRIVATE_TORCH_ALLOWED = {
    # dynamo records F.linear under this name; it is what a graph's node.target is
    "torch._C._nn.linear",
}


def module_sources() -> Dict[str, str]:
    """``{module name: source}`` for every module of the package (passes/ is lors_fx.passes)."""
    sources = {}
    for folder, package in ((ROOT / "lors_fx", "lors_fx"), (ROOT / "passes", "lors_fx.passes")):
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            sources[".".join([package] + parts)] = path.read_text(encoding="utf-8")
    return sources


def layer_of(module: str) -> Optional[int]:
    """Index in :data:`LAYERS` of the longest matching prefix (None: not lors_fx)."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    return None if best is None else best[0]


def _is_package(module: str, sources: Dict[str, str]) -> bool:
    return any(other.startswith(module + ".") for other in sources)


def imports_of(module: str, source: str, sources: Dict[str, str]):
    """``[(target module, line, inside a function)]``: every import in ``source``, relative ones
    resolved, ``from pkg import submodule`` resolved to the submodule."""
    tree = ast.parse(source)
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(sub) for sub in ast.walk(node) if sub is not node)
    package = module if _is_package(module, sources) else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        inside = id(node) in in_function
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, inside) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in sources else target, node.lineno, inside))
    return found


def upward_imports(sources: Dict[str, str]) -> List[str]:
    """Each import of a higher layer, as a readable line."""
    problems = []
    for module, source in sources.items():
        own = layer_of(module)
        for target, line, _ in imports_of(module, source, sources):
            other = layer_of(target)
            if own is not None and other is not None and other > own:
                problems.append(f"{module}:{line} ({LAYERS[own][0]}) imports {target} "
                                f"({LAYERS[other][0]})")
    return problems


def import_graph(sources: Dict[str, str]) -> nx.DiGraph:
    graph = nx.DiGraph()
    for module, source in sources.items():
        graph.add_node(module)
        for target, _, _ in imports_of(module, source, sources):
            if target in sources and target != module:
                graph.add_edge(module, target)
    return graph


def test_every_import_points_down():
    assert upward_imports(module_sources()) == []


def test_a_deliberate_upward_import_is_caught():
    sources = module_sources()
    sources["lors_fx.ops"] += "\nfrom lors_fx.api import optimize\n"
    sources["lors_fx.passes._match"] += "\ndef f():\n    from lors_fx.cli import main\n"
    problems = upward_imports(sources)
    assert any(p.startswith("lors_fx.ops:") and "lors_fx.api (api)" in p for p in problems)
    assert any(p.startswith("lors_fx.passes._match:") and "lors_fx.cli.main" in p
               for p in problems)


def test_every_module_has_a_layer():
    assert [m for m in module_sources() if layer_of(m) is None] == []


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(import_graph(module_sources())))
    assert cycles == []


def test_a_cycle_is_caught():
    sources = module_sources()
    sources["lors_fx.config"] += "\nfrom lors_fx.ops import sparse_lora_linear\n"
    sources["lors_fx.ops"] += "\nfrom lors_fx.config import LorsConfig\n"
    assert list(nx.simple_cycles(import_graph(sources)))


def test_no_package_import_inside_a_function():
    sources = module_sources()
    hidden = [f"{module}:{line} imports {target}" for module, source in sources.items()
              for target, line, inside in imports_of(module, source, sources)
              if inside and target.startswith("lors_fx")]
    assert hidden == []


def test_lazy_imports_are_optional_or_explained():
    sources = module_sources()
    stdlib = set(sys.stdlib_module_names)
    lazy = sorted({f"{module}: {target}" for module, source in sources.items()
                   for target, _, inside in imports_of(module, source, sources)
                   if inside and not target.startswith("lors_fx")
                   and target.split(".")[0] not in stdlib
                   and target.split(".")[0] not in LAZY_IMPORTS})
    assert lazy == []


_PRIVATE_TORCH = re.compile(r"\btorch(?:\.[A-Za-z]\w*)*\._[A-Za-z]\w*(?:\.\w+)*")


def private_torch_uses(sources: Dict[str, str]) -> List[str]:
    uses = []
    for module, source in sources.items():
        if module == "lors_fx.compiler._torch_private":
            continue
        for number, line in enumerate(source.splitlines(), 1):
            code = line.split("#", 1)[0]
            for match in _PRIVATE_TORCH.findall(code):
                if match not in PRIVATE_TORCH_ALLOWED:
                    uses.append(f"{module}:{number}: {match}")
    return uses


def test_private_torch_only_in_torch_private():
    assert private_torch_uses(module_sources()) == []


def test_a_private_torch_use_is_caught():
    sources = {"lors_fx.ops": "from torch._dynamo.utils import counters\n",
               "lors_fx.passes._match": "x = torch._inductor.config.fx_graph_cache\n"}
    assert len(private_torch_uses(sources)) == 2


def _global_warning_filters(module: str, source: str) -> List[str]:
    """``warnings.filterwarnings``/``simplefilter`` calls not inside ``warnings.catch_warnings()``."""
    tree = ast.parse(source)
    scoped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any("catch_warnings" in ast.unparse(item.context_expr)
                                              for item in node.items):
            scoped.update(id(sub) for sub in ast.walk(node))
    return [f"{module}:{node.lineno}" for node in ast.walk(tree)
            if isinstance(node, ast.Call) and id(node) not in scoped
            and ast.unparse(node.func) in ("warnings.filterwarnings", "warnings.simplefilter")]


def test_no_process_wide_warning_filters():
    found = [hit for module, source in module_sources().items()
             for hit in _global_warning_filters(module, source)]
    assert found == []


@pytest.mark.parametrize("limit", [400])
def test_modules_are_small(limit):
    sizes = {m: s.count("\n") for m, s in module_sources().items()}
    assert {m: n for m, n in sizes.items() if n > limit} == {}


def test_functions_are_short():
    long = []
    for module, source in module_sources().items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60 and not node.name.startswith("add_") \
                        and "arguments" not in node.name:
                    long.append(f"{module}.{node.name}: {length} lines")
    assert long == []
