"""The package layout is a fact a test checks: every import in ``mobiletune/`` goes to its
own layer or one listed before it (README, "Layout"); ``mobiletune/`` never imports
``export/``; the phone side imports no desktop framework."""

import ast
from pathlib import Path

from tests.helpers import imported

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["errors", "io", "families", "runtime", "assets", "models", "formats", "inference",
          "train", "programs", "side", "fed", "cli"]


def layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "mobiletune" or len(parts) < 2:
        return None
    return LAYERS.index(parts[1]) if parts[1] in LAYERS else None


def imports(path: Path):
    """Every absolute import in a file (module level and inside functions)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_imports_only_run_downward():
    bad = []
    for p in (ROOT / "mobiletune").rglob("*.py"):
        rel = p.relative_to(ROOT).with_suffix("")
        me = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        mine = layer(me if me != "mobiletune.__main__" else "mobiletune.cli")
        for target in imports(p):
            if target.split(".")[0] == "export":
                bad.append(f"{rel}: imports {target} (mobiletune never imports export/)")
            theirs = layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(f"{rel} ({LAYERS[mine]}) imports {target} ({LAYERS[theirs]})")
    assert not bad, "\n".join(sorted(set(bad)))


def test_every_package_has_a_layer():
    pkgs = {p.parent.name for p in (ROOT / "mobiletune").glob("*/__init__.py")}
    mods = {p.stem for p in (ROOT / "mobiletune").glob("*.py")} - {"__init__", "__main__"}
    assert pkgs | mods == set(LAYERS)


def test_the_phone_side_imports_no_desktop_framework():
    mods = sorted("mobiletune." + ".".join(p.relative_to(ROOT / "mobiletune").with_suffix("").parts)
                  for p in (ROOT / "mobiletune" / "runtime").rglob("*.py")
                  if p.stem not in ("__main__",))
    mods = [m.removesuffix(".__init__") for m in mods]
    assert imported("import " + ", ".join(mods)) == []
