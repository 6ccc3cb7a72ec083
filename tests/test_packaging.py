"""What the wheel holds and how the checkout-only suites are found."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile

import pytest

from fedjax_users import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_wheel_ships_fedjax_users_only_with_its_configs_and_data(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), REPO],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"fedjax_users"}
    assert "fedjax_users/configs/user/local_gradient.yaml" in names
    assert "fedjax_users/configs/case/default.yaml" in names
    assert "fedjax_users/data/digits.npz" in names


def test_find_checkout_from_the_repository_and_below_it():
    assert cli.find_checkout(REPO) == REPO
    assert cli.find_checkout(os.path.join(REPO, "tests", "data")) == REPO


def test_find_checkout_outside_any_checkout(tmp_path):
    assert cli.find_checkout(str(tmp_path), package_parent=str(tmp_path)) is None


def test_suite_outside_a_checkout_says_how_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli, "find_checkout", lambda *args, **kwargs: None)
    assert cli.main(["parity", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "python -m parity" in err and "checkout" in err


def test_import_is_light_and_submodules_are_reachable():
    code = (
        "import sys, fedjax_users as fu; heavy = {'torch', 'dp_accounting'} & set(sys.modules); "
        "assert not heavy, heavy; fu.models.get('lenet_zhu'); fu.data.load_case; "
        "assert 'torch' not in sys.modules; fu.interop.to_torch; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        import fedjax_users as fu

        fu.nonexistent  # noqa: B018


def _make_dry_run(tmp_path, *extra):
    """``make -n run`` against a venv whose stamp files are newer than the lock (as after a first install)."""
    venv = tmp_path / f"venv{len(list(tmp_path.iterdir()))}"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / "torchvision-src" / "torchvision" / "models").mkdir(parents=True)
    (venv / "torchvision-src" / "torchvision" / "models" / "resnet.py").touch()
    for stamp in (".run-installed", ".test-installed"):
        (venv / stamp).touch()
    done = subprocess.run(["make", "-n", "-C", REPO, f"VENV={venv}", *extra, "run"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_make_run_installs_only_when_the_lock_or_pyproject_changed(tmp_path):
    # The second make run of the README: nothing to install, only the run.
    unchanged = _make_dry_run(tmp_path)
    assert "pip install" not in unchanged and "fedjax-users run" in unchanged
    # A changed lock (make's -W: as if just modified) installs it again, breaching's case files too.
    changed = _make_dry_run(tmp_path, "-W", "requirements/run.txt")
    assert re.search(r"pip install [-\w ]*-r requirements/run.txt", changed) and "breaching==0.1.2" in changed


def test_building_the_package_prints_no_setuptools_deprecation(tmp_path):
    # setuptools warned three times per install about the license table; the metadata build shows it.
    script = (
        "import warnings, setuptools.build_meta as b\n"
        "warnings.simplefilter('error')\n"
        f"print(b.prepare_metadata_for_build_wheel({str(tmp_path)!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Deprecat" not in done.stderr and done.stdout.strip().endswith(".dist-info")


def test_an_editable_install_prints_no_setuptools_banner(tmp_path):
    # make run / make test install with pip install -e .: setuptools' import-hook strategy printed an
    # "Editable installation" banner each time; the package-dir setting makes it a plain .pth file.
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--ignore-installed", "-e", REPO,
         "--prefix", str(tmp_path)], capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Editable installation" not in done.stdout + done.stderr
    (pth,) = tmp_path.glob("lib/python*/site-packages/__editable__.fedjax_users*.pth")
    assert pth.read_text().strip() == REPO
