"""Layering (issue 14 item 4): the coordinator and the agencies share only ``agencyfl.federation`` and
``agencyfl.privacy``; neither imports the other or the CLI; the exit-code table imports only the errors."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "agencyfl"
FORBIDDEN = {
    "server": ("agencyfl.clients", "agencyfl.cli"),
    "clients": ("agencyfl.server", "agencyfl.cli"),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_server_and_clients_never_import_each_other_or_the_cli() -> None:
    crossings = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for part, banned in FORBIDDEN.items()
        for path in sorted((PACKAGE / part).rglob("*.py"))
        for name in _imports(path)
        if any(name == b or name.startswith(b + ".") for b in banned)
    ]
    assert crossings == []


def test_the_exit_code_table_imports_only_the_domain_errors() -> None:
    ours = {name for name in _imports(PACKAGE / "exit_codes.py") if name.startswith("agencyfl")}
    assert ours == {"agencyfl.federation.errors"}
