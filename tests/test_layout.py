"""The package layout as a contract: each wing imports only what its docstring allows.

``router`` is a front door (app, cli, admin, demo, samplecrm) on shared basics and wings
that follow a call's path (lookup, rules, records, crm, web); ``dialplan`` and ``ami``
sit beside it. A new import that runs the wrong way (a wing importing the front door,
rules importing the lookup, ...) fails here with the module and the import named.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("router", "dialplan", "ami")

BASICS = ("router", "router.settings", "router.errors", "router.models", "router.metrics",
          "router.log", "router.keys", "router.phone", "router.runner", "router.audit",
          "router.crypto")
FRONT_DOOR = ("router.app", "router.cli", "router.admin", "router.demo", "router.samplecrm")

#: Module prefix -> the prefixes it may import (besides itself and the basics).
ALLOWED: dict[str, tuple[str, ...]] = {
    # The settings embed the CRM connector's configuration model (crm.config).
    "router.settings": ("router.crm.config", "router.crm.mapping"),
    "router.lookup": ("router.crm.base",),
    "router.rules": (),
    "router.records": ("router.crm.base",),
    "router.crm": (),
    "router.auth": (),
    "router.web": ("router.lookup", "router.rules", "router.records", "router.crm.base",
                   "router.auth"),
    "dialplan": ("router.lookup.base", "router.rules"),
    "ami": ("router.rules.presence",),
}


def module_name(path: Path) -> str:
    """``router/lookup/cache.py`` -> ``router.lookup.cache``."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The callroute modules that a file imports (absolute imports, any position)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def is_module(name: str) -> bool:
    """Whether ``name`` is a module or package of ours (not a name imported from one)."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def rule_for(name: str) -> tuple[str, tuple[str, ...]] | None:
    """The most specific ALLOWED entry for module ``name`` (None: unrestricted)."""
    if name in FRONT_DOOR:
        return None
    keys = sorted((k for k in ALLOWED if under(name, k)), key=len, reverse=True)
    if keys:
        return keys[0], ALLOWED[keys[0]]
    if name in BASICS:
        return name, ()
    return None


def modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def violations(name: str, imported: set[str]) -> list[str]:
    """The imports of module ``name`` that its wing may not make."""
    rule = rule_for(name)
    if rule is None:
        return []
    own, allowed = rule
    return sorted(
        i for i in imported
        if is_module(i) and not under(i, own) and i not in BASICS
        and not any(under(i, a) for a in allowed)
    )


@pytest.mark.parametrize("path", modules(), ids=lambda p: module_name(p))
def test_module_imports_only_what_its_wing_allows(path: Path) -> None:
    """Every module's imports of callroute modules stay inside what its wing may import,
    and every module belongs to a wing, the basics or the front door."""
    name = module_name(path)
    assert rule_for(name) is not None or name in FRONT_DOOR, \
        f"{name} belongs to no wing: add it to the layout"
    bad = violations(name, imports_of(path))
    assert not bad, f"{name} imports {bad}, outside what its wing may import"


def test_the_layout_check_catches_a_wrong_way_import() -> None:
    """The check itself flags rules importing the front door or the lookup, and the
    lookup importing the records, while a basic or an allowed import passes."""
    assert violations("router.rules.decide", {"router.app", "router.lookup.cache",
                                              "router.models", "router.rules.spec"}) == [
        "router.app", "router.lookup.cache"]
    assert violations("router.lookup.cache", {"router.records.outbox",
                                              "router.crm.base"}) == ["router.records.outbox"]
    assert violations("dialplan.route", {"ami.tracker", "router.lookup.base"}) == [
        "ami.tracker"]
    assert violations("router.app", {"ami.tracker", "dialplan.route"}) == []


def test_every_wing_has_a_docstring_saying_what_it_may_import() -> None:
    """Each package's docstring says what the wing does and what it may import."""
    for init in sorted(ROOT.glob("*/__init__.py")) + sorted(ROOT.glob("router/*/__init__.py")):
        if init.parent.name not in PACKAGES and init.parent.parent.name != "router":
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 80, f"{init} needs a docstring (what the wing does)"
        if init.parent.parent.name == "router":
            assert "import" in doc, f"{init}: say what the wing may import"


#: Folders of tests/ that are harnesses or data, not the tests of one package.
TEST_HARNESSES = {"asterisk", "crm_fakes", "fixtures"}


def test_tests_mirror_the_packages() -> None:
    """Every test package under tests/ is named after a package of the project
    (tests/router/web holds router/web's tests), but for the harnesses: a test folder for
    a wing that does not exist, or one put beside its package's folder, fails here."""
    stray = []
    for init in sorted((ROOT / "tests").rglob("__init__.py")):
        folder = init.parent.relative_to(ROOT / "tests")
        if folder == Path() or folder.parts[0] in TEST_HARNESSES:
            continue
        if not (ROOT / folder / "__init__.py").exists():
            stray.append(str(folder))
    assert stray == []
