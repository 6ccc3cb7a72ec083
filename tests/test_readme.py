"""The README's example runs as written, from a folder outside the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

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


@pytest.mark.slow
def test_readme_case_commands_run_as_written_after_make_run(tmp_path):
    """The README's shell lines for breaching's cases, verbatim, in a fresh folder.

    As after ``make run``: the folder holds the ``.venv`` (this test's own environment, which has
    what ``make run`` installs), and ``~/data`` a generated CIFAR-10 in its python-batch layout.
    """
    from data.cifar_fakes import write_fake_cifar

    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S) if "fedjax-users cases" in b]
    home = tmp_path / "home"
    write_fake_cifar(str(home / "data"), "CIFAR10", per_file=300)
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(sys.prefix, work / ".venv")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(HOME=str(home), PATH="/usr/bin:/bin")  # nothing of the test's environment on the PATH
    result = subprocess.run(["bash", "-e", "-c", block], cwd=work, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4_fedavg_small_scale" in result.stdout  # fedjax-users cases
    runs = sorted(os.listdir(work / "runs"))
    assert [r.rsplit("-", 2)[0] for r in runs] == ["single_image_small", "single_imagenet"]
    for run in runs:
        assert {"config.yaml", "summary.json", "shared_update.msgpack"} <= set(os.listdir(work / "runs" / run))
