"""The README's Layout section and the tree agree: every module of model/ and pipeline/ is named
there under its package, nothing named there is missing, and every job module is listed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1]
    return re.search(r"^```\n(.*?)^```", section, flags=re.S | re.M).group(1)


def listed_files(block: str) -> set[str]:
    """Paths of the .py files the block names, from its indentation (two spaces a level)."""
    found, folders = set(), []
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        if not line.strip() or indent % 2 or indent > 8:
            continue  # a description's continuation line
        depth = indent // 2
        folders = folders[:depth]
        head = re.split(r"\s{2,}", line.strip())[0]
        for name in (n.strip() for n in head.split(",")):
            if name.endswith("/"):
                folders.append(name.rstrip("/"))
            elif name.endswith(".py"):
                found.add("/".join([*folders, name]))
    return found


def test_every_module_of_model_and_pipeline_is_in_the_readme_layout_and_nothing_else():
    tree = {
        str(p.relative_to(ROOT))
        for top in ("model", "pipeline")
        for p in (ROOT / top).rglob("*.py")
        if p.name != "__init__.py"
    }
    listed = {p for p in listed_files(layout_block()) if p.split("/")[0] in ("model", "pipeline")}
    assert len(tree) > 40  # the scan sees the packages
    assert sorted(tree - listed) == [], "modules the README's Layout does not name"
    assert sorted(listed - tree) == [], "names in the README's Layout with no module"


def test_every_job_module_is_in_the_readme_layout():
    block = layout_block()
    jobs_text = block.split("\njobs/", 1)[1].split("\ntests/", 1)[0]
    modules = sorted(p.name for p in (ROOT / "jobs").glob("*.py") if p.name != "__init__.py")
    assert "segment.py" in modules and "cli.py" in modules
    assert [m for m in modules if m not in jobs_text] == []


def test_the_layout_parser_reads_nesting_and_lists():
    block = "a/   x\n  b.py, c.py   y\n  d/   z\n    e.py   w\n              continued text.py\nf/\n  g.py\n"
    assert listed_files(block) == {"a/b.py", "a/c.py", "a/d/e.py", "f/g.py"}
