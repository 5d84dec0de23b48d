"""The documentation site (`make docs`): it builds with `--strict`, every public name has a
reference entry whose arguments are all documented, and every Python block of every page runs
as written."""

from __future__ import annotations

import dataclasses
import glob
import inspect
import os
import re
import subprocess
import sys
import zlib

import pytest

import torch_tpu_estimator

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
BLOCKS = [(os.path.relpath(page, ROOT), block) for page in PAGES
          for block in re.findall(r"^```python\n(.*?)^```", open(page).read(), re.M | re.S)]


def test_the_pages_have_python_blocks_to_run():
    assert len(BLOCKS) >= 7  # the examples of getting started, the guides and porting


@pytest.mark.parametrize("page, block", BLOCKS,
                         ids=[f"{page}#{index}" for index, (page, _) in enumerate(BLOCKS)])
def test_every_python_block_of_the_docs_runs_as_written(tmp_path, page, block):
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600,
                          env=dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="1"))
    assert done.returncode == 0, f"{page}:\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built as `make docs` builds it."""
    directory = tmp_path_factory.mktemp("site")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(directory)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return directory


def _inventory(site) -> set[str]:
    """The object names of the site's Sphinx inventory (what mkdocstrings rendered)."""
    with open(site / "objects.inv", "rb") as handle:
        data = handle.read()
    body = zlib.decompress(data.split(b"\n", 4)[4]).decode()
    return {line.split(" ", 1)[0] for line in body.splitlines() if line}


def test_every_public_name_has_a_reference_entry(site):
    rendered = _inventory(site)
    modules = torch_tpu_estimator._EXPORTS
    missing = [name for name in torch_tpu_estimator.__all__
               if f"torch_tpu_estimator.{modules[name]}.{name}" not in rendered]
    assert not missing


def _documented(docstring: str) -> set[str]:
    """The names an `Args:` or `Attributes:` section of a Google-style docstring documents."""
    names, section = set(), False
    for line in (docstring or "").splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Attributes:", "Arguments:"):
            section = True
        elif section and re.match(r"^[A-Z][A-Za-z ]*:$", stripped):
            section = False
        elif section and (match := re.match(r"^\*{0,2}(\w+)(?: \(.*\))?:", stripped)):
            names.add(match.group(1))
    return names


def _arguments(value) -> list[str]:
    if dataclasses.is_dataclass(value):
        return [field.name for field in dataclasses.fields(value) if field.init]
    target = value.__init__ if inspect.isclass(value) else value
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return []
    return [parameter.name for parameter in parameters if parameter.name not in ("self",)
            and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)]


@pytest.mark.parametrize("name", torch_tpu_estimator.__all__)
def test_every_argument_of_a_public_name_is_documented(name):
    value = getattr(torch_tpu_estimator, name)
    if inspect.isclass(value) and issubclass(value, BaseException):
        return  # an error's argument is its message
    docstrings = inspect.getdoc(value) or ""
    if inspect.isclass(value) and value.__init__ is not object.__init__:
        docstrings += "\n" + (inspect.getdoc(value.__init__) or "")
    undocumented = set(_arguments(value)) - _documented(docstrings)
    assert not undocumented, f"{name}: {sorted(undocumented)}"
