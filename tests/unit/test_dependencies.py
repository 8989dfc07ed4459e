"""Dependencies point one way: every import in the package against the README's table.

The table ("package | never imports") is read from README.md, so the document and the rule
cannot drift apart. Imports inside functions count (they run too); imports under
``if TYPE_CHECKING:`` do not. A second test starts the master the way `kvpool master` does
and checks that the node stack (nodes, NVMe, kernels, lmdb, torch) was never loaded.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"kvpool": ROOT / "kvpool", "kvpool.tiers": ROOT / "tiers", "kvpool.kernels": ROOT / "kernels"}


def rules() -> list[tuple[list[str], list[str]]]:
    """(packages, what they never import) rows of the README's dependency table."""
    text = (ROOT / "README.md").read_text()
    table = re.search(r"\| package \| never imports \|\n\|---\|---\|\n((?:\|.*\|\n)+)", text).group(1)
    out = []
    for row in table.splitlines():
        left, right = row.strip("|").split("|")
        out.append((re.findall(r"`([\w.]+)`", left), re.findall(r"`([\w.]+)`", right)))
    return out


def modules() -> dict[str, Path]:
    out = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if prefix == "kvpool" and parts[:1] in (["rpc"],):
                continue  # generated stubs
            out[".".join([prefix, *parts])] = path
    return out


def _type_checking(node: ast.If) -> bool:
    return isinstance(node.test, (ast.Name, ast.Attribute)) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m == "kvpool" or m.startswith("kvpool.")}


def within(module: str, package: str) -> bool:
    full = f"kvpool.{package}"
    return module == full or module.startswith(full + ".")


def violations() -> list[str]:
    table = rules()
    out = []
    for name, path in sorted(modules().items()):
        for packages, forbidden in table:
            if not any(within(name, p) for p in packages):
                continue
            for dep in sorted(imports(path)):
                for f in forbidden:
                    if within(dep, f) and not within(name, f):
                        out.append(f"{path.relative_to(ROOT)}: {name} imports {dep} ({'/'.join(packages)} never "
                                   f"imports {f})")
    return sorted(set(out))


def test_the_readme_table_has_the_rules():
    table = rules()
    assert (["master"], ["node", "client", "cli", "server"]) in table
    assert any("tiers" in p and "rpc" in f for p, f in table)


def test_every_import_follows_the_one_way_rule():
    assert len(modules()) > 40
    found = violations()
    assert not found, "imports against the dependency table in README.md:\n" + "\n".join(found)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    # The same checker, on a module that breaks a rule, must report it.
    bad = ROOT / "kvpool" / "master" / "_dependency_probe.py"
    bad.write_text("def f():\n    from kvpool.node.node import Node\n")
    try:
        assert any("_dependency_probe" in v and "kvpool.node.node" in v for v in violations())
    finally:
        bad.unlink()


def test_kvpool_master_never_loads_the_node_stack(tmp_path):
    code = """
import asyncio, sys
from kvpool.cli.main import build_parser
from kvpool.cli.flags import settings_from_args
from kvpool.config import MasterSettings
from kvpool.server import PoolServer  # what `kvpool master` runs

args = build_parser().parse_args(["master", "--port", "0", "--metrics-port", "-1"])
server = PoolServer(settings_from_args(MasterSettings, args))

async def cycle():
    await server.start()
    await server.stop()

asyncio.run(cycle())
heavy = ("kvpool.node", "kvpool.kernels", "kvpool.tiers.nvme", "kvpool.tiers.hbm", "lmdb", "torch", "triton")
print(sorted(m for m in sys.modules if m.startswith(heavy)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout
