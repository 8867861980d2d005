"""The worked examples in docs/ run as written."""

from __future__ import annotations

import re
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_backup_loop_runs(tmp_path, capsys):
    blocks = python_blocks(DOCS / "backup.md")
    assert len(blocks) == 1
    (tmp_path / "backup").mkdir()
    namespace = {"image": str(tmp_path / "db.img"), "backup": str(tmp_path / "backup" / "db.img")}
    exec(compile(blocks[0], "docs/backup.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "as it should:" in out and "unclean" in out
