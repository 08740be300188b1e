"""The layout docs/architecture.md promises: no import cycle, and the pipeline's models change only through it."""

import ast
from pathlib import Path

import pytest
import torch

from ldmkit import Pipeline

SOURCE = Path(__file__).resolve().parents[1] / "src" / "ldmkit"


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """ldmkit modules `path` imports anywhere (inside functions too); the package itself is not counted (its
    lazy __getattr__ serves `from ldmkit import Pipeline`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ldmkit"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name in modules and name != "ldmkit"} - {module_name(path)}


def test_no_module_imports_one_that_imports_it_back():
    paths = {module_name(p): p for p in SOURCE.rglob("*.py")}
    graph = {name: imports_of(path, set(paths)) for name, path in paths.items()}
    cycles = []

    def visit(name, stack):
        for dependency in graph[name]:
            if dependency in stack:
                cycles.append([*stack[stack.index(dependency) :], dependency])
            elif dependency not in done:
                visit(dependency, [*stack, dependency])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert cycles == []


def test_the_pipelines_models_are_read_only_and_change_through_apply(tiny_components):
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    for name in ("unet", "vae", "text_encoder", "dtype", "state"):
        with pytest.raises(AttributeError):
            setattr(pipe, name, None)
    pipe.enable_vae_tiling(512)
    assert pipe.state.transforms == ("vae_tiling:512",) and pipe.state.vae_tile_px == 512
