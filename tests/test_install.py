"""Installable as users install it.

The repository's address lives in one place, pyproject.toml's [project.urls] Repository: every
notebook's Colab badge and install cell, and every GitHub link of the documentation, must use it.
The wheel built from the sources, installed into a fresh virtual environment (its dependencies
from the environment that runs the tests, nothing downloaded: the system Python, a virtual
environment or a conda-style one), must run the quick start from a folder outside the repository.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "tutorials").glob("*.ipynb"))
DOCUMENTS = [REPO / "README.md", REPO / "tutorials" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# GitHub repositories the documentation may link to besides this one: the libraries it builds on, and
# SAEBench, whose output layout the SAEBench-style JSON follows.
OTHER_REPOSITORIES = {"TransformerLensOrg/TransformerLens", "jbloomAus/SAELens", "adamkarvonen/SAEBench"}
GITHUB_REPOSITORY = re.compile(r"https://github\.com/([\w.-]+/[\w-]+(?:\.(?!git\b)[\w-]+)*)")
COLAB_NOTEBOOK = re.compile(r"https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/tutorials/([\w.-]+)")


def repository_url() -> str:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["urls"]["Repository"]


def repository() -> str:
    """owner/name of the repository URL."""
    match = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+)", repository_url())
    assert match, f"project.urls Repository must be a GitHub repository URL, got {repository_url()!r}"
    return match.group(1)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_badge_and_install_cell_use_the_repository_url(path):
    nb = nbformat.read(path, as_version=4)
    badges = COLAB_NOTEBOOK.findall(nb.cells[0].source)
    assert badges == [(repository(), path.name)], f"{path.name}: the Colab badge must open {repository()}/tutorials/{path.name}"
    install = next(cell.source for cell in nb.cells if cell.cell_type == "code")
    assert f'"opt_hooks @ git+{repository_url()}.git"' in install, f"{path.name}: the install cell must pip install {repository_url()}"
    every_colab = [m for cell in nb.cells for m in COLAB_NOTEBOOK.findall(cell.source)]
    assert {owner_name for owner_name, _ in every_colab} == {repository()}


@pytest.mark.parametrize("path", [*NOTEBOOKS, *DOCUMENTS], ids=[p.relative_to(REPO).as_posix() for p in [*NOTEBOOKS, *DOCUMENTS]])
def test_every_github_link_is_the_repository_or_a_library_it_builds_on(path):
    text = path.read_text(encoding="utf-8")
    linked = set(GITHUB_REPOSITORY.findall(text))
    assert linked <= {repository(), *OTHER_REPOSITORIES}, (
        f"{path.relative_to(REPO)} links to {sorted(linked - {repository(), *OTHER_REPOSITORIES})}: "
        f"this repository is {repository_url()} (pyproject.toml project.urls)"
    )


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def site_directories() -> list[str]:
    """The site-packages folders this interpreter reads: its own, and its base's where it is a virtual
    environment that includes the system site packages (the user's site too, where enabled)."""
    folders = [*site.getsitepackages(), *([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])]
    folders += [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    return list(dict.fromkeys(f for f in folders if Path(f).is_dir()))


def reuse_site_packages(python: Path, env: dict[str, str]) -> None:
    """Make the packages of the interpreter that runs the tests importable in the fresh venv of
    `python`, after the venv's own. `venv --system-site-packages` reuses the *base* interpreter's
    packages, which have no torch when the tests run inside a virtual environment (or, from a venv,
    point past a conda environment's); a .pth of `site.addsitedir` lines reuses this one's, wherever
    it lives. An editable install of opt_hooks there adds a finder after the path finder, so the
    wheel in the venv's own site-packages is still the one imported (the test checks it)."""
    own = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=python.parent, env=env).strip()
    lines = [f"import site; site.addsitedir({folder!r})" for folder in site_directories()]
    (Path(own) / "_opt_hooks_test_parent_site.pth").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.slow
def test_the_wheel_runs_the_quick_start_in_a_fresh_virtual_environment(tmp_path):
    # Built from a copy of what setuptools reads, so that the checkout gets no build/ folder and
    # whatever package-data misses is missing from the wheel.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(REPO / "opt_hooks", source / "opt_hooks", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist),
         str(source)], cwd=tmp_path, env=env)
    (wheel,) = dist.glob("opt_hooks-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(archive.read(n).decode() for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    assert f"Project-URL: Repository, {repository_url()}" in metadata.splitlines()

    # The packages of the environment that runs the tests (torch, sae_lens, ...) are reused; its pip
    # installs into the venv.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, env=env)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    reuse_site_packages(python, env)
    run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", str(wheel)],
        cwd=tmp_path, env=env)

    outside = tmp_path / "elsewhere"  # not the checkout: nothing can be imported from it by accident
    outside.mkdir()
    where = run([str(python), "-c", "import opt_hooks; print(opt_hooks.__file__)"], cwd=outside, env=env).strip()
    assert Path(where).is_relative_to(venv), f"opt_hooks imported from {where}, not from the wheel"
    report = outside / "report"
    run([str(python.parent / "opt-hooks"), "report", "--out", str(report)], cwd=outside, env=env)
    written = json.loads((report / "report.json").read_text(encoding="utf-8"))
    assert written["layers"] and (report / "report.html").is_file()


def _commands(text: str) -> list[str]:
    """The shell commands of a text: one per line, `&&` split, comments and pip's -q dropped."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        out += [" ".join(part.replace(" -q ", " ").split()) for part in line.split("&&") if part.strip()]
    return out


def _readme_block(heading: str) -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split(f"## {heading}\n", 1)[1]
    return _commands(section.split("```bash\n", 1)[1].split("```", 1)[0])


def test_ci_installs_and_tests_as_the_readme_tells_a_user_to():
    """CI (.ci/run) makes the README's fresh virtual environment, runs its install lines there (torch
    pinned to the CPU build) and ends with its test command, so what CI passes is what a user runs."""
    ci = _commands((REPO / ".ci" / "run").read_text(encoding="utf-8"))
    install, test_command = _readme_block("Install"), _readme_block("Quick start")[-1]
    positions = []
    for command in install:
        expected = command.replace("pip install torch", "pip install torch==")  # the README's torch, pinned
        found = [k for k, line in enumerate(ci) if line.startswith(expected)]
        assert found, f".ci/run does not run the README's {command!r}"
        positions.append(found[0])
    assert positions == sorted(positions), ".ci/run must run the README's install lines in the README's order"
    assert ci[-1] == test_command, f".ci/run must end with the README's test command {test_command!r}, not {ci[-1]!r}"
