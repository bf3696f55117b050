"""The package's layers, and that no import runs upward (lazy imports inside functions included).

A module may import from its own layer or any layer below it. The library never imports the offline tools
(data_pipelines): the pipeline runs them as a process.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "omni_train"

# lowest first; a module's layer is that of its longest matching prefix
LAYERS = [
    ("omni_train.config", "omni_train.kernels", "omni_train.compat"),
    ("omni_train.parallel", "omni_train.metrics", "omni_train.summary", "omni_train.resilience"),
    ("omni_train.models",),
    ("omni_train.data", "omni_train.losses", "omni_train.rewards"),
    ("omni_train.checkpoint", "omni_train.planning"),
    ("omni_train.stages", "omni_train.export", "omni_train.frozen", "omni_train.rollout"),
    ("omni_train.session", "omni_train.loops"),
    ("omni_train.train", "omni_train.pipeline", "omni_train.launch", "omni_train.__init__"),
]


def _layer(module: str) -> int:
    best = (-1, -1)
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                best = max(best, (len(prefix), level))
    assert best[1] >= 0, f"{module} is in no layer: add it to LAYERS"
    return best[1]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno


def test_no_import_runs_upward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        own = _layer(name if name != "omni_train" else "omni_train.__init__")
        for imported, line in _imports(path):
            if imported.startswith("data_pipelines"):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports the offline tool {imported}")
            elif imported.startswith("omni_train.") and _layer(imported) > own:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported} "
                              f"(layer {_layer(imported)} above {own})")
    assert not upward, "\n".join(upward)


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        _layer(name if name != "omni_train" else "omni_train.__init__")
