"""The layering rules, checked by walking the imports of the source (every `import`
statement, also those inside functions), transitively through our own modules:

- `onellm.runtime` never reaches torch, `onellm.export` or `onellm.ref`;
- `onellm.ref` never reaches `onellm.export`.

A walker that found nothing would pass every rule, so it is first shown to catch a
violation hidden two modules deep in a synthetic package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# installed package -> folder in the repository (pyproject's package-dir)
PACKAGE_DIRS = {
    "onellm.runtime": REPO / "runtime",
    "onellm.ref": REPO / "onellm_ref",
    "onellm.export": REPO / "export",
    "onellm.benchmarks": REPO / "benchmarks",
}
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchgen", "functorch"}
# Registries that import every module of their package by name at run time (importlib),
# which no import statement shows: reaching the registry reaches all of them.
DISCOVERING = {"onellm.runtime.modalities.base": "onellm.runtime.modalities."}


def _module_files(root_pkg: str, folder: Path) -> dict[str, Path]:
    out = {}
    for path in folder.rglob("*.py"):
        rel = path.relative_to(folder).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([root_pkg, *parts])] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module `name` imports: our modules by full name, others by top-level name."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from pkg import sub` may name a submodule
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
        else:
            continue
        for t in targets:
            if t.startswith("onellm"):
                # the longest known module that prefixes t (plain `onellm` is the version module)
                while t and t not in known:
                    t = t.rpartition(".")[0]
                if t:
                    found.add(t)
            else:
                found.add(t.split(".")[0])
    return found


def reachable(start: str, known: dict[str, Path]) -> set[str]:
    """Modules reachable from `start`: our modules and external top-level names."""
    seen, todo = set(), [start]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        if mod in known:
            todo.extend(_imports(mod, known[mod], known))
            if mod in DISCOVERING:
                todo.extend(m for m in known if m.startswith(DISCOVERING[mod]))
            # importing a.b.c imports its parent packages too
            parent = mod.rpartition(".")[0]
            while parent:
                if parent in known:
                    todo.append(parent)
                parent = parent.rpartition(".")[0]
    return seen


def violations(known: dict[str, Path], layer: str, forbidden_internal: tuple[str, ...],
               forbidden_external: set[str]) -> dict[str, list[str]]:
    bad = {}
    for mod in sorted(m for m in known if m == layer or m.startswith(layer + ".")):
        hit = sorted(
            r for r in reachable(mod, known)
            if r.startswith(forbidden_internal) or r in forbidden_external
        )
        if hit:
            bad[mod] = hit
    return bad


@pytest.fixture(scope="module")
def known() -> dict[str, Path]:
    mods = {"onellm": REPO / "__init__.py", "onellm.cli": REPO / "cli.py"}
    for pkg, folder in PACKAGE_DIRS.items():
        mods.update(_module_files(pkg, folder))
    return mods


def test_walker_catches_a_violation_two_modules_deep(tmp_path: Path) -> None:
    pkg = tmp_path / "runtime"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n    return g\n")
    (pkg / "c.py").write_text("import numpy\n\ndef g():\n    import torch.nn as nn\n    return nn\n")
    fake = _module_files("onellm.runtime", pkg)
    bad = violations(fake, "onellm.runtime", ("onellm.export",), TORCH_FAMILY)
    assert bad["onellm.runtime.a"] == ["torch"]
    assert "onellm.runtime.sub.b" in bad and "onellm.runtime.c" in bad


def test_walker_sees_our_real_dependencies(known) -> None:
    """The walk reaches what the runtime really uses (else the rules below prove nothing)."""
    reach = reachable("onellm.runtime.pipeline", known)
    assert {"onellm.runtime.decoder", "onellm.runtime.encoder", "onellm.runtime.modalities.imu"} <= reach
    assert {"numpy", "onnxruntime", "llama_cpp"} <= reach
    assert "torch" in reachable("onellm.ref.model", known)


def test_runtime_never_reaches_torch_export_or_the_reference(known) -> None:
    bad = violations(known, "onellm.runtime", ("onellm.export", "onellm.ref"), TORCH_FAMILY)
    assert not bad, f"runtime modules reaching forbidden imports: {bad}"


def test_reference_never_reaches_export(known) -> None:
    bad = violations(known, "onellm.ref", ("onellm.export",), set())
    assert not bad, f"reference modules reaching onellm.export: {bad}"


def test_version_module_imports_nothing(known) -> None:
    assert reachable("onellm", known) == {"onellm"}
