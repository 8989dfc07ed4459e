"""Citations of the design document point at sections that exist in docs/design.md.

The code, tests, protos and docs cite the design by section (``docs/design.md §3b``). A citation
of a section that is not there, or of the old ``DESIGN.md`` (not in the repository), fails here.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DESIGN = ROOT / "docs" / "design.md"
CITATION = re.compile(r"(?i)\b((?:docs/)?design\.md)\s*§\s*(\d+[a-z]?)")
SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__", "build", "kvpool-data", ".pytest_cache"}
SUFFIXES = {".py", ".md", ".proto", ".toml", ".yaml", ".yml", ".json", ".txt", ".cfg", ".sh", ""}


def sections() -> set[str]:
    return set(re.findall(r"^## (\d+[a-z]?)\. ", DESIGN.read_text(), re.M))


def project_files():
    """The checkout's own files: git's list where there is one (so ignored scratch such as
    venvs and build outputs never counts), else a walk that skips the usual generated dirs."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split("\n")
        return [ROOT / name for name in listed if name]
    except (OSError, subprocess.CalledProcessError):
        return [p for p in ROOT.rglob("*") if not any(
            part in SKIP_DIRS or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]


def cited() -> list[tuple[str, int, str, str]]:
    out = []
    for path in project_files():
        if not path.is_file() or path.suffix not in SUFFIXES or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            for name, section in CITATION.findall(line):
                out.append((str(path.relative_to(ROOT)), n, name, section))
    return out


def test_the_design_document_has_its_numbered_sections():
    assert {"1", "2", "3", "3b", "3c", "4", "5", "6", "7"} <= sections()


def test_every_citation_names_a_section_of_docs_design_md():
    found = cited()
    assert len(found) >= 15  # the code does cite it; a broken pattern would find nothing
    have = sections()
    missing = [f"{p}:{n}: {name} §{s}" for p, n, name, s in found if s not in have]
    assert not missing, f"these cite sections that docs/design.md does not have: {missing}"
    old = [f"{p}:{n}" for p, n, name, _ in found if name != "docs/design.md"]
    assert not old, (f"these cite DESIGN.md, which is not in the repository: {old}; repoint them with "
                     f"git grep -l 'DESIGN\\.md' | xargs sed -i -E 's/DESIGN\\.md §/docs\\/design.md §/g'")
