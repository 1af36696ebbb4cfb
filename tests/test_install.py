"""Installing the project claims no generic top-level name: after a regular install and after an
editable one (its import finder included), a Python started outside the checkout finds none of
data, models, zo, program, train, eval. The code runs from a checkout (pyproject.toml
`packages = []`: an install brings the dependencies only)."""

import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ("data", "models", "zo", "program", "train", "eval")
# the checkout as a fresh clone has it: built outside it, so no build files land in it
SKIP = shutil.ignore_patterns(
    ".git", ".venv", ".cache", "runs", "build", "*.egg-info", "__pycache__"
)
# a Python whose one site directory is `site_dir` (its .pth files and import finders processed)
CLAIMED = (
    "import importlib.util as u, site, sys; site.addsitedir(sys.argv[1]); "
    f"print(' '.join(n for n in {NAMES!r} if u.find_spec(n)))"
)


def claimed(site_dir) -> str:
    cmd = [sys.executable, "-I", "-S", "-c", CLAIMED, str(site_dir)]  # -S: no other site dir
    result = subprocess.run(cmd, cwd="/", capture_output=True, text=True, check=True)
    return result.stdout.strip()


def test_checkout_claims_a_name_it_would_find():
    """The check can fail: a site directory that holds the checkout's packages claims them."""
    assert claimed(ROOT) == " ".join(NAMES)


def test_an_install_claims_no_generic_name(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=SKIP)
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(target), str(source)], check=True, cwd=tmp_path)
    assert claimed(target) == ""


def test_an_editable_install_claims_no_generic_name(tmp_path):
    source, wheels, site_dir = tmp_path / "source", tmp_path / "wheels", tmp_path / "site"
    shutil.copytree(ROOT, source, ignore=SKIP)
    build = f"import setuptools.build_meta as b; print(b.build_editable({str(wheels)!r}))"
    wheels.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", build], cwd=source, capture_output=True, text=True, check=True
    )
    with zipfile.ZipFile(wheels / out.stdout.strip().splitlines()[-1]) as wheel:
        wheel.extractall(site_dir)
    assert claimed(site_dir) == ""
