"""The tutorials (tutorials/*.ipynb): stored clean, open in Colab, and run top to bottom.

Every notebook is executed offline with nbclient (kernel "python3") under the documented switch
OPT_HOOKS_TUTORIAL_OFFLINE=1 (tutorials/README.md): the install cell is skipped and hub models
are replaced by the embedded default. Each runs in its own temporary working directory, so the
reports it writes never land in the checkout.

    python tests/test_tutorials.py --strip    # clear outputs and execution counts before committing
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from test_install import repository, repository_url

REPO = Path(__file__).resolve().parent.parent
TUTORIALS = REPO / "tutorials"
EXPECTED = ["01_quick_start.ipynb", "02_hierarchy_and_absorption.ipynb", "03_layer_report.ipynb", "04_repair.ipynb"]
OFFLINE_SWITCH = "OPT_HOOKS_TUTORIAL_OFFLINE"

# The repository's public address: pyproject.toml's project.urls (tests/test_install.py checks the notebooks use it).
GITHUB = repository_url()
COLAB = f"https://colab.research.google.com/github/{repository()}/blob/main/tutorials/"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
REPO_LINK = re.compile(re.escape(GITHUB) + r"/blob/main/([^)\s#]+)(?:#([^)\s]+))?")

CELL_TIMEOUT_S = 600
# How `opt-hooks report` reports a failed run or a usage error on the console.
SHELL_ERROR = re.compile(r"^(opt-hooks report: )?error:", re.MULTILINE)


def notebook_paths() -> list[Path]:
    return sorted(TUTORIALS.glob("*.ipynb"))


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def cell_id(path: Path, position: int) -> str:
    """The id a tutorial's cell is stored with: its notebook's number and its position ("t01-07").
    nbformat 4.5 requires an id on every cell; nbformat fills a missing one in memory with a
    warning, and says that will become an error."""
    return f"t{path.name[:2]}-{position:02d}"


def strip(path: Path) -> bool:
    """Clear outputs and execution counts, and number the cells' ids, in place; True when the file
    changed."""
    nb = read(path)
    for position, cell in enumerate(nb.cells):
        cell.id = cell_id(path, position)
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    text = nbformat.writes(nb) + "\n"
    if path.read_text(encoding="utf-8") == text:
        return False
    path.write_text(text, encoding="utf-8")
    return True


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(markdown_file: Path) -> set[str]:
    found, in_code = set(), False
    for line in markdown_file.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (match := re.match(r"#{1,6} (.+)", line)):
            found.add(github_slug(match.group(1)))
    return found


ids = [p.name for p in notebook_paths()]


def test_the_tutorials_exist_and_are_listed_in_the_readme():
    assert ids == EXPECTED
    readme = (TUTORIALS / "README.md").read_text(encoding="utf-8")
    for name in EXPECTED:
        assert name in readme
    assert OFFLINE_SWITCH in readme


@pytest.mark.parametrize("path", notebook_paths(), ids=ids)
def test_notebook_is_stored_clean(path):
    nb = read(path)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    dirty = [k for k, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have stored outputs or execution counts; run `python tests/test_tutorials.py --strip`"
    stored = json.loads(path.read_text(encoding="utf-8"))["cells"]  # as on disk: nbformat.read fills missing ids
    wrong = [k for k, cell in enumerate(stored) if cell.get("id") != cell_id(path, k)]
    assert not wrong, f"{path.name}: cells {wrong} have no id or not their own; run `python tests/test_tutorials.py --strip`"


@pytest.mark.parametrize("path", notebook_paths(), ids=ids)
def test_notebook_has_colab_badge_and_guarded_install(path):
    nb = read(path)
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    assert f"[![Open In Colab]({BADGE_IMAGE})]({COLAB}{path.name})" in first.source, f"{path.name}: no Colab badge"
    code = [cell.source for cell in nb.cells if cell.cell_type == "code"]
    install = code[0]
    assert "pip" in install and OFFLINE_SWITCH in install, f"{path.name}: the first code cell must be the guarded install"
    for source in code:  # magics cannot sit in a Python if-block: the install must be plain Python
        assert not re.search(r"^\s*[%!]+\s*pip\b", source, re.MULTILINE), f"{path.name}: unguarded pip magic"
    assert "GPU" in first.source, f"{path.name}: the introduction should say which runtime to choose"


@pytest.mark.parametrize("path", notebook_paths(), ids=ids)
def test_notebook_links_point_at_existing_files_and_headings(path):
    text = "\n".join(cell.source for cell in read(path).cells if cell.cell_type == "markdown")
    links = REPO_LINK.findall(text)
    assert links, f"{path.name}: links to the documentation expected"
    for target, anchor in links:
        file = REPO / target
        assert file.is_file(), f"{path.name}: link to missing {target}"
        if anchor:
            assert anchor in anchors(file), f"{path.name}: {target} has no heading with anchor #{anchor}"


@pytest.mark.slow
@pytest.mark.parametrize("path", notebook_paths(), ids=ids)
def test_notebook_runs_offline(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv(OFFLINE_SWITCH, "1")
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(variable, "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend, as in Jupyter
    # The kernel ("python", by the python3 kernelspec) and `!opt-hooks` resolve to this interpreter.
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    nb = read(path)
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs if o.output_type == "error"]
    assert not errors
    # progress bars render cleanly: no tqdm "IProgress not found" warning (no ipywidgets in the kernel)
    noisy = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and any("IProgress not found" in o.get("text", "") for o in cell.outputs)]
    assert not noisy, f"{path.name}: cells {noisy} print tqdm's IProgress warning"
    shell_failures = [cell.source for cell in nb.cells if cell.cell_type == "code" and cell.source.lstrip().startswith("!")
                      and any(SHELL_ERROR.search(o.get("text", "")) for o in cell.outputs)]
    assert not shell_failures, f"{path.name}: a shell command failed: {shell_failures}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--strip"]:
        sys.exit("usage: python tests/test_tutorials.py --strip")
    for notebook in notebook_paths():
        print(("stripped " if strip(notebook) else "clean    ") + str(notebook.relative_to(REPO)))
