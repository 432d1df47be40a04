"""The package's shape: no import cycles, modules importable on their own, and a type
checker that sees calls between Pollinate's modules (``make lint``)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_PACKAGE = {"tests", "benchmarks", "docs", "configs", "runs", "build"}

# No module pair may import each other (not even lazily, one way).
KNOWN_CYCLES: list[set[str]] = []


def package_modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``pollinate.client.serving``)."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[0] in NOT_PACKAGE or any(p.startswith(".") for p in parts):
            continue
        names = parts[:-1] if parts[-1] == "__init__" else parts
        modules[".".join(("pollinate", *names))] = path
    return modules


def imported(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``module`` imports anywhere (functions too), not for typing only."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                name = f"{base}.{alias.name}"
                out.add(name if name in modules else base)
    return {m for m in out if m in modules and m != module}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

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
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    modules = package_modules()
    graph = {m: imported(m, p, modules) for m, p in modules.items()}
    assert "pollinate.cli" not in graph["pollinate.deploy.server"]  # the cycle that was
    unexpected = [c for c in cycles(graph) if c not in KNOWN_CYCLES]
    assert not unexpected, f"import cycles: {unexpected}"


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


@pytest.mark.slow
def test_every_module_imports_on_its_own() -> None:
    """Each module in a fresh interpreter: an import-order dependency or cycle fails here."""
    names = sorted(set(package_modules()) - {"pollinate.__main__"})  # that one runs the CLI
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}

    def failure(name: str) -> str | None:
        r = subprocess.run(
            [sys.executable, "-c", f"import {name}"],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        return f"{name}: {last}" if r.returncode else None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        failures = [f for f in pool.map(failure, names) if f]
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_mypy_sees_calls_between_modules(tmp_path: Path) -> None:
    """The way `make lint` runs mypy (the package under its real name) catches a wrong
    argument to another Pollinate module's function: nothing there resolves to Any."""
    (tmp_path / "pollinate").symlink_to(ROOT)
    config = tmp_path / "mypy.ini"
    config.write_text(f"[mypy]\nmypy_path = {tmp_path}\nignore_missing_imports = True\n")
    program = (
        "from pollinate.text import one_line\n"
        "from pollinate.client.errors import check_kind\n"
        "ok: str = one_line(ValueError('x')) + check_kind('global')\n"
        "bad: int = one_line('x')\n"
    )

    def mypy(text: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mypy", "--config-file", str(config), "-c", text],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=600,
            env={**os.environ, "MYPY_CACHE_DIR": str(tmp_path / "cache")},
        )

    caught = mypy(program)
    assert caught.returncode == 1, caught.stdout + caught.stderr
    assert 'Incompatible types in assignment (expression has type "str"' in caught.stdout
    clean = mypy(program.rsplit("bad:", 1)[0])
    assert clean.returncode == 0, clean.stdout + clean.stderr
