"""The README's examples run as written, and its two commands are the ones CI uses."""

import contextlib
import io
import pathlib
import re

import pytest

from _cuda_targets import EMULATOR

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEXT = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)


def _needs(code):
    marks = []
    if "import torch" in code:
        marks.append(pytest.mark.skipif(not _has("torch"), reason="needs PyTorch"))
    if "cuda_emulator" in code:
        marks.append(pytest.mark.skipif(not EMULATOR, reason="no C++ compiler (g++ or $CXX) "
                                                             "for the CUDA host emulation"))
    return marks


def _has(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_readme_has_its_examples():
    assert re.search(r"## Example\n\n```python\n", TEXT)
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("code", [pytest.param(c, marks=_needs(c), id=f"block{i}")
                                  for i, c in enumerate(BLOCKS)])
def test_readme_example_runs(code):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    printed = out.getvalue()
    # numbers a block's comments quote are the ones it prints
    for line in re.findall(r"^# ((?:L2 |decoupled |zeros: ).*)$", code, re.M):
        quoted = line[:line.index("]") + 1] if "]" in line else line
        assert quoted in printed, (quoted, printed)
    if "print(mask.nbytes" in code:
        assert printed == "8000 bytes of mask for 64000 elements\n"


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```\n(python -m .*?)\n```", TEXT)
    assert len(commands) == 2, commands
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
