"""The package's layout rule (see `early_exit/__init__.py`): the decoding runtime never imports the training-and-tools
wing, no modules import each other in a circle, and the command line parses its arguments before torch loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "early_exit"
TOOLS = ("early_exit.data", "early_exit.training", "early_exit.calibration", "early_exit.reporting")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path, module_level_only: bool) -> set[str]:
    """The `early_exit` modules `path` imports (resolving relative imports), outside `if TYPE_CHECKING:` blocks; with
    `module_level_only`, also outside functions (the imports that run when the module is imported)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if module_level_only and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
                # `from . import absolute` imports the submodule `absolute`.
                found.update(
                    f"{base}.{alias.name}"
                    for alias in child.names
                    if (PACKAGE.parent / base.replace(".", "/") / f"{alias.name}.py").is_file()
                )
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name != module and (name == "early_exit" or name.startswith("early_exit."))}


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _is_tool(module: str) -> bool:
    return any(module == tool or module.startswith(tool + ".") for tool in TOOLS)


def test_the_runtime_never_imports_the_tools_wing():
    offenders = {
        module: sorted(filter(_is_tool, _imports(path, module_level_only=False)))
        for module, path in _modules().items()
        if not _is_tool(module)
    }
    assert {module: tools for module, tools in offenders.items() if tools} == {}


def test_no_modules_import_each_other_in_a_circle():
    modules = _modules()
    graph = {module: _imports(path, module_level_only=True) & set(modules) for module, path in modules.items()}
    state: dict[str, str] = {}

    def cycle_from(module: str, trail: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return [*trail[trail.index(imported) :], imported] if imported in trail else [module, imported]
            if imported not in state and (found := cycle_from(imported, [*trail, imported])):
                return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            assert cycle_from(module, [module]) is None


def _fresh_interpreter(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=PACKAGE.parent
    ).stdout


@pytest.mark.parametrize("module", ["early_exit", "early_exit.generation"])
def test_importing_the_runtime_loads_no_training_code(module):
    loaded = _fresh_interpreter(
        f"import sys, {module}; print(sorted(m for m in ('transformers.trainer', 'datasets', 'early_exit.training', "
        "'early_exit.calibration', 'early_exit.data') if m in sys.modules))"
    )
    assert loaded.strip() == "[]"


def test_the_command_line_parses_before_torch_loads():
    printed = _fresh_interpreter(
        "import sys\nfrom early_exit_cli import main\ntry:\n    main(['generate', '--help'])\nexcept SystemExit:\n"
        "    pass\nprint('torch' in sys.modules, 'transformers' in sys.modules, 'early_exit' in sys.modules)"
    )
    assert "--speculative" in printed
    assert printed.splitlines()[-1] == "False False False"
