"""The package's floors: no module imports from a higher floor (so there is no import cycle between floors).

Floors, lowest first (a module may import from its own floor and any floor below it):

0. ``io``, ``text_encoder``, ``assets`` (the module), ``world``: leaves that import nothing else from ``rehyat``
   (output files, the MiniLM text encoder and the caption-embedding table, the shipped model paths, the
   procedural video world); every floor may use them.
1. ``ops``: attention kernels and feature-map math.
2. ``modules``: ``nn.Module`` feature maps.
3. ``models``: the converted Wan transformer, its recurrent runner, compilation.
4. ``pipelines``, ``testing``: model folders and the video pipeline; ``testing`` builds tiny models and pipelines.
5. ``training``, ``evaluation``: they run pipelines and models; neither imports the other.
6. ``commands``, ``cli`` and the package ``__init__`` (the public facade, which nothing inside imports).

Every ``import`` and ``from ... import`` counts, also those inside functions (the lazy ones still run up a floor).
"""

from __future__ import annotations

import ast
from pathlib import Path

import rehyat

PACKAGE = Path(rehyat.__file__).resolve().parent

FLOORS = {
    "io": 0, "text_encoder": 0, "assets": 0, "world": 0,
    "ops": 1,
    "modules": 2,
    "models": 3,
    "pipelines": 4, "testing": 4,
    "training": 5, "evaluation": 5,
    "commands": 6, "cli": 6, "": 6,
}
# same floor, but separate: neither imports the other
APART = {frozenset({"training", "evaluation"})}


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _exists(name: str, package: Path) -> bool:
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (package / rel).with_suffix(".py").is_file() or (package / rel / "__init__.py").is_file()


def _resolve(name: str, package: Path) -> str:
    """``rehyat.a.b.Name`` -> the longest prefix that is a module or package of ``rehyat``."""
    while "." in name and not _exists(name, package):
        name = name.rsplit(".", 1)[0]
    return name


def _imports(path: Path, package: Path):
    """``(line, imported module)`` for every import of a ``rehyat`` module in the file at ``path``."""
    mod = _module_name(path, package)
    current = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = current.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            targets = [f"{base}.{a.name}" for a in node.names]  # `from pkg import submodule` imports the submodule
        else:
            continue
        for t in targets:
            if t == "rehyat" or t.startswith("rehyat."):
                yield node.lineno, _resolve(t, package)


def _unit(module: str) -> str:
    """The floor's key of a module: ``rehyat.training.data`` -> ``training``, ``rehyat`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(package: Path = PACKAGE) -> list[str]:
    """Every import from a lower floor to a higher one (or between separate units of one floor), as text."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        src = _unit(_module_name(path, package))
        for line, target in _imports(path, package):
            dst = _unit(target)
            if src == dst:
                continue
            if FLOORS[dst] > FLOORS[src] or frozenset({src, dst}) in APART:
                bad.append(f"{path.relative_to(package.parent)}:{line} ({src or 'rehyat'}, floor {FLOORS[src]}) "
                           f"imports {target} ({dst or 'rehyat'}, floor {FLOORS[dst]})")
    return bad


def test_every_module_has_a_floor():
    units = {_unit(_module_name(p, PACKAGE)) for p in PACKAGE.rglob("*.py")}
    assert units <= set(FLOORS), f"give these a floor in tests/test_layering.py: {sorted(units - set(FLOORS))}"


def test_no_import_runs_up_a_floor():
    bad = upward_imports()
    assert not bad, "imports up a floor:\n" + "\n".join(bad)


def test_the_walk_sees_lazy_relative_imports(tmp_path):
    """The checker itself: a function-level ``from ..training.data import X`` in pipelines is reported."""
    pkg = tmp_path / "rehyat"
    (pkg / "pipelines").mkdir(parents=True)
    (pkg / "training").mkdir()
    for f in ("__init__.py", "pipelines/__init__.py", "training/__init__.py", "training/data.py"):
        (pkg / f).write_text("")
    (pkg / "pipelines" / "video.py").write_text("def f():\n    from ..training.data import X\n")
    (pkg / "training" / "user.py").write_text("from ..pipelines import video\nfrom rehyat.pipelines.video import f\n")
    bad = upward_imports(pkg)
    assert len(bad) == 1 and bad[0].startswith("rehyat/pipelines/video.py:2 ") and "rehyat.training.data" in bad[0]
