"""The layers: jobs (application) -> {serve, llava}, serve -> llava, never back up, no import circles.

Imports are read from the source (module level and inside functions alike), so a lazy import that
would climb a layer is caught as well as a top-level one.
"""

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jobs", "serve", "llava")
ALLOWED = {"jobs": {"jobs", "serve", "llava"}, "serve": {"serve", "llava"}, "llava": {"llava"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (a `from pkg import name` counts as pkg.name when that is a module)."""
    files = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module or ""
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in files else stem for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # a.b.name -> a.b
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def package_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {
        (a.split(".")[0], b.split(".")[0])
        for a, targets in graph.items()
        for b in targets
        if a.split(".")[0] != b.split(".")[0]
    }


def test_imports_only_go_down_the_layers():
    edges = package_edges(project_imports())
    upward = sorted((a, b) for a, b in edges if b not in ALLOWED[a])
    assert not upward, f"imports that climb a layer: {upward}"
    assert edges == {("jobs", "serve"), ("jobs", "llava"), ("serve", "llava")}


def test_no_module_imports_itself_through_a_circle():
    graph = project_imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # a package's __init__ that re-exports a submodule is not a circle a newcomer must untangle
    real = [c for c in cycles if not any(b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not real, "import circles: " + "; ".join(" -> ".join(c) for c in real)


def test_serving_imports_nothing_from_training(tiny_checkpoint):
    """A Serve replica (serve.app, serve.engine) and the model loader it uses never import llava.training."""
    code = (
        "import sys\n"
        "import serve.app, serve.engine\n"
        "from llava.model_loading import load_model\n"
        f"load_model({str(tiny_checkpoint)!r}, device='cpu')\n"
        "print(sorted(m for m in sys.modules if m.startswith('llava.training')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("run_dir_given", [True, False])
def test_a_run_dir_resolves_to_the_model_its_run_produced(tmp_path, run_dir_given):
    from llava.run_format import RUN_OUTPUT_FILE, RunOutput, is_run_dir, model_dir, resolve_model_uri

    checkpoint = str(tmp_path / "run" / "checkpoint_1")
    RunOutput(model_dir(checkpoint), checkpoint, steps=3).write(str(tmp_path / "run"))
    assert (tmp_path / "run" / RUN_OUTPUT_FILE).exists() and is_run_dir(str(tmp_path / "run"))
    given = str(tmp_path / "run") if run_dir_given else model_dir(checkpoint)
    assert resolve_model_uri(given) == str(tmp_path / "run" / "checkpoint_1" / "hf")
    assert RunOutput.read(str(tmp_path / "run")).steps == 3
