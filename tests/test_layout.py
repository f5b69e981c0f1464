"""The house rules of the package's layout, checked on the source (no imports run):
dependencies without cycles, data below models, short modules and functions, Ray only where
work is distributed, and a README layout map that names every module."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "diet_ray"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60  # in distill/ and memory/


def modules() -> Dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        name = ".".join(p.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def imports(mods: Dict[str, Path]) -> Dict[str, Set[str]]:
    """Each module's diet_ray imports, lazy ones included (a lazy import is still a dependency)."""
    out = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diet_ray"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("diet_ray"))
        out[name] = {d for d in deps if d in mods and d != name}
    return out


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_and_data_never_imports_models():
    graph = imports(modules())
    assert cycles(graph) == []
    upward = sorted((m, d) for m, ds in graph.items() for d in ds
                    if m.startswith("diet_ray.data") and d.startswith("diet_ray.models"))
    assert upward == []


def test_models_know_nothing_of_ray():
    for name, path in modules().items():
        if name.startswith("diet_ray.models") or name == "diet_ray.schema":
            assert not re.search(r"^\s*(import ray|from ray)", path.read_text(), re.M), name


def test_modules_and_functions_stay_short():
    long_modules, long_functions = [], []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(name)
        if name.startswith(("diet_ray.distill", "diet_ray.memory")):
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                        long_functions.append(f"{name}.{node.name}")
    assert long_modules == [] and long_functions == []


def test_the_readme_layout_names_every_module():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    named: Set[str] = set()
    folder = ""
    for line in block.splitlines():
        m = re.match(r"^  (\w+)/\s+(.*)$", line)
        if m:
            folder, rest = m.group(1), m.group(2)
        elif re.match(r"^\s{3,}\S", line):
            rest = line  # continues the folder above
        elif line.startswith("  "):
            folder, rest = "", line
        else:
            continue
        rest = re.sub(r"(\w*)\{([\w,]+)\}", lambda m: " ".join(m.group(1) + w for w in m.group(2).split(",")), rest)
        for word in re.findall(r"[A-Za-z_]\w*", rest.replace(".py", "")):
            named.add(f"{folder}/{word}" if folder else word)
    missing = []
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).with_suffix("")
        if rel.name == "__init__":
            continue
        parts = rel.parts
        key = "/".join(parts[:2]) if len(parts) > 1 else parts[0]
        if key not in named:
            missing.append(str(rel))
    assert missing == [], f"README layout misses: {sorted(missing)}"


def test_the_data_path_does_not_import_torch():
    """``diet-ray prepare`` (and Ray Data's read workers) load data code only: no torch."""
    import subprocess
    import sys

    code = "import sys, diet_ray.data.prepare, diet_ray.data.stages; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
