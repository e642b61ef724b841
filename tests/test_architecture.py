"""The layering of docs/architecture.md, enforced: imports run one way and never reach another package's privates."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "nmsparse"
# Lower tiers first; a package may import its own tier-mates only where ALLOWED_SAME_TIER says so.
TIERS = [
    {"common"},
    {"patterns"},
    {"formats", "kernels"},
    {"nn"},
    {"data", "models"},
    {"prune"},
    {"train", "compile"},
    {"bench"},
    {"demo"},
    {"cli"},
    {""},  # the top-level package (nmsparse/__init__.py): the public API re-exported
]
TIER = {pkg: i for i, tier in enumerate(TIERS) for pkg in tier}
ALLOWED_SAME_TIER = {("models", "data")}  # models rebuild from records that name a dataset's shape and classes
LIMIT_LINES = 400


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        yield path, parts, is_pkg


def _imports(path: Path, parts: list[str], is_pkg: bool):
    """(target module parts, imported names, line) for every nmsparse import in the file, nested ones included."""
    pkg = parts if is_pkg else parts[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                if not node.module:  # `from . import demo`: each name is a module of the package
                    for a in node.names:
                        yield base + [a.name], [], node.lineno
                    continue
                target = base + node.module.split(".")
            elif node.module and node.module.split(".")[0] == "nmsparse":
                target = node.module.split(".")
            else:
                continue
            yield target, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "nmsparse":
                    yield a.name.split("."), [], node.lineno


def _package(parts: list[str]) -> str:
    """The first-level package ("nn", "train", ...) of a module path; "" for nmsparse itself."""
    return parts[1] if len(parts) > 1 else ""


def _violations():
    out = []
    for path, parts, is_pkg in _modules():
        src = _package(parts)
        if src not in TIER:
            out.append(f"{path}: package {src!r} has no tier in tests/test_architecture.py (add it and to the doc)")
            continue
        for target, names, line in _imports(path, parts, is_pkg):
            dst = _package(target)
            if dst == src:
                continue
            if dst not in TIER:
                out.append(f"{path}:{line}: imports unknown package {'.'.join(target)}")
                continue
            if TIER[dst] > TIER[src] or (TIER[dst] == TIER[src] and (src, dst) not in ALLOWED_SAME_TIER):
                out.append(f"{path}:{line}: {src or 'nmsparse'} (tier {TIER[src]}) imports {'.'.join(target)} "
                           f"(tier {TIER[dst]}); imports run from higher tiers to lower ones only")
            private = [p for p in target[2:] + names if p.startswith("_") and not p.endswith("__")]
            if private:
                out.append(f"{path}:{line}: imports private {', '.join(private)} from another package "
                           f"({'.'.join(target)}); make it public there or keep it inside its package")
    return out


def test_imports_run_one_way_and_stay_public():
    problems = _violations()
    assert not problems, "\n".join(problems)


def test_the_checker_sees_violations(tmp_path):
    """The check itself: a lower layer importing a higher one, and a private name, are both reported."""
    fake = tmp_path / "nmsparse"
    (fake / "patterns").mkdir(parents=True)
    (fake / "train").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "patterns" / "__init__.py").write_text("")
    (fake / "train" / "__init__.py").write_text("")
    (fake / "patterns" / "bad.py").write_text("def f():\n    from ..train.loop import train\n")
    (fake / "train" / "worse.py").write_text("from ..patterns.nm import _grouped_mask\n")
    globals()["SRC"], saved = fake, SRC
    try:
        problems = _violations()
    finally:
        globals()["SRC"] = saved
    assert any("bad.py:2" in p and "imports run from higher tiers" in p for p in problems)
    assert any("worse.py:1" in p and "private _grouped_mask" in p for p in problems)


def test_modules_are_small_or_say_why():
    long = []
    for path, _, _ in _modules():
        text = path.read_text()
        lines = text.count("\n")
        if lines > LIMIT_LINES and "longer than 400 lines because" not in text[:2000]:
            long.append(f"{path.relative_to(SRC)}: {lines} lines")
    assert not long, "modules over ~400 lines without a reason stated at their top:\n" + "\n".join(long)


def test_cpp_lives_in_cpp_files():
    for path, _, _ in _modules():
        text = path.read_text()
        assert "#include <" not in text, f"{path}: C++ belongs in a .cpp file under kernels/csrc/"


@pytest.mark.parametrize("pkg", sorted(p for p in TIER if p and (SRC / p).is_dir()))
def test_every_package_is_documented(pkg):
    doc = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    assert f"`{pkg}/`" in doc, f"docs/architecture.md does not describe {pkg}/"
