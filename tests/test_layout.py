"""The package's imports flow one way and form no circle.

Layers, lowest first: `kernels/`; the model, data, metrics and other core modules;
`training/`; `analysis/` (and the package's own `__init__`, the public API); the
command-line tools (`main`, `sample`, `analyze`, `plan`, `compile_check`). A module imports from its
own layer or below, never above, and no chain of imports comes back to where it
started. Every import counts, including those inside functions.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "gated_attention_jax"
NAME = PACKAGE.name
CLIS = ("main", "sample", "analyze", "plan", "compile_check")
LAYERS = ("kernels", "core", "training", "analysis", "cli")


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
  parts = module.split(".")[1:]
  if not parts:
    return "analysis"  # the public API's facade: above training, below the tools
  if parts[0] in ("kernels", "training", "analysis"):
    return parts[0]
  return "cli" if parts[0] in CLIS else "core"


def imported_modules(module: str) -> set[str]:
  """The package's modules `module` imports (a name imported from a package that is not
  a submodule counts as the package's `__init__`)."""
  tree = ast.parse(MODULES[module].read_text())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.split(".")[0] == NAME)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
        and node.module.split(".")[0] == NAME:
      for alias in node.names:
        sub = f"{node.module}.{alias.name}"
        found.add(sub if sub in MODULES else node.module)
  return {m for m in found if m != module}


GRAPH = {m: imported_modules(m) for m in MODULES}


def test_every_module_is_seen():
  assert {"gated_attention_jax.training.train", "gated_attention_jax.kernels.api",
          "gated_attention_jax.analysis.run_analysis", "gated_attention_jax.main"} <= set(GRAPH)
  assert all(target in MODULES for targets in GRAPH.values() for target in targets)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_never_run_up_a_layer(module):
  rank = LAYERS.index(layer(module))
  upward = sorted(t for t in GRAPH[module] if LAYERS.index(layer(t)) > rank)
  assert not upward, f"{module} ({layer(module)}) imports {upward} from above"


def test_no_import_circles():
  state: dict[str, str] = {}

  def visit(module: str, path: list[str]) -> None:
    state[module] = "open"
    for target in sorted(GRAPH[module]):
      if state.get(target) == "open":
        cycle = path[path.index(target):] + [target]
        pytest.fail("import circle: " + " -> ".join(cycle))
      if target not in state:
        visit(target, path + [target])
    state[module] = "done"

  for module in sorted(GRAPH):
    if module not in state:
      visit(module, [module])
