"""The README's "Inspect it" commands (issue #12), run exactly as written on a real vault."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import command

import modelvault

README = Path(__file__).resolve().parent.parent / "README.md"


def inspect_commands() -> list[str]:
    section = README.read_text(encoding="utf-8").split("## Inspect it", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_the_readme_sqlite_utils_commands_show_the_vault(tmp_path):
    sqlite_utils = command("sqlite-utils")
    if sqlite_utils is None:
        pytest.fail("sqlite-utils is in the test extra: pip install -e '.[test]'")
    with modelvault.open(tmp_path / "models.vault") as vault:
        vault.save("churn", {"w": np.arange(10.0)}, aliases=["prod"], tags={"stage": "dev"})
        vault.save("churn", {"w": np.arange(11.0)}, metadata={"auc": 0.91})
        vault.save("labels", {"names": ["cat", "dog"]})
    commands = inspect_commands()
    assert [shlex.split(c)[:2] for c in commands] == [["sqlite-utils", "tables"],
                                                      ["sqlite-utils", "rows"]]
    outputs = [subprocess.run([sqlite_utils, *shlex.split(c)[1:]], cwd=tmp_path,
                              capture_output=True, text=True, check=True).stdout
               for c in commands]
    counts = {t["table"]: t["count"] for t in json.loads(outputs[0])}
    assert counts["models"] == 2 and counts["versions"] == 3 and counts["aliases"] == 1
    rows = json.loads(outputs[1])
    assert [(r["name"], r["version"]) for r in rows] == [("churn", 1), ("churn", 2),
                                                        ("labels", 1)]
    assert rows[0]["aliases"] == "prod" and rows[0]["tags"] == "stage=dev"
    assert json.loads(rows[1]["metadata"]) == {"auc": 0.91}
