"""The README's example runs as written, from a folder outside the repository."""

from __future__ import annotations

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_example_runs(monkeypatch, capsys, tmp_path):
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    (example,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    monkeypatch.chdir(tmp_path)  # no configs/ here: the example must not depend on the checkout
    exec(compile(example, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "4 8"  # 4 local steps; lenet_zhu: 4 layers, each a kernel and a bias
    assert "epsilon" in lines[1] and "delta" in lines[1]
    assert lines[2] == "(8, 32, 32, 3)"
