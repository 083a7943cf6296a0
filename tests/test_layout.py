"""The package layout's dependency rules (README "Where things are"), read from the source: the feature cache
knows no model, stage two never imports stage one, only deploy/ and cli/ import both stages, and inside heads/ a
subpackage imports only those upstream of it."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {   # package -> top-level packages its modules must never import
    "cache": {"heads", "extract", "deploy", "cli"},
    "extract": {"heads", "deploy", "cli"},
    "heads": {"extract", "deploy", "cli"},
    "deploy": {"cli"},
}
HEADS_ALLOWED = {   # subpackage of heads/ -> the subpackages it may import
    "model": set(),
    "train": {"model"},
    "evaluation": set(),
    "baselines": {"model", "train", "evaluation"},
    "results": {"evaluation", "baselines"},
    "sweep": {"model", "train", "evaluation", "baselines", "results"},
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_upstream(package):
    bad = [f"{path.relative_to(ROOT)} imports {name}" for path in sorted((ROOT / package).rglob("*.py"))
           for name in sorted(imported_modules(path)) if name.split(".")[0] in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


def test_heads_subpackages_import_only_upstream():
    assert {p.parent.name for p in (ROOT / "heads").glob("*/__init__.py")} == set(HEADS_ALLOWED)
    bad = []
    for sub, allowed in HEADS_ALLOWED.items():
        for path in sorted((ROOT / "heads" / sub).rglob("*.py")):
            for name in sorted(imported_modules(path)):
                parts = name.split(".")
                if parts[0] == "heads" and len(parts) > 1 and parts[1] in HEADS_ALLOWED \
                        and parts[1] != sub and parts[1] not in allowed:
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)
