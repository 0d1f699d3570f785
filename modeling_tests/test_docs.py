"""Every runnable example in docs/ runs, and prints what its page says it prints.

The blocks of a page execute in order, in one namespace. The convention for printed output: a ```python block
that prints is followed (blank lines aside) by a ```text block holding exactly what it writes to stdout. Lines are
compared one by one, trailing spaces ignored, with two allowances:

- `...` in an expected line stands for any text within that line (run times, object addresses);
- a number written with a decimal point or an exponent matches a printed number within 1e-3 relative or 1e-6
  absolute (float rounding differs across machines); integers and all other text must match exactly.

A runnable block that prints without such a text block fails, so every printed value on a page is checked.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
NEEDS_THE_HUB = re.compile(r"path/to/|google/|lmsys/|meta-llama/")
BLOCK = re.compile(r"```python\n(?P<code>.*?)```(?:\s*\n```text\n(?P<expected>.*?)```)?", re.S)
FLOAT = r"[-+]?(?:\d+\.\d*|\.\d+|\d+(?=[eE]))(?:[eE][-+]?\d+)?"
EXPECTED_PIECE = re.compile(rf"(?P<ellipsis>\.\.\.)|(?P<float>{FLOAT})")


def runnable_blocks(page: Path) -> list[tuple[str, str | None]]:
    """`(code, expected stdout or None)` of every block that runs without the Hub, in page order."""
    blocks = [(match["code"], match["expected"]) for match in BLOCK.finditer(page.read_text())]
    return [(code, expected) for code, expected in blocks if not NEEDS_THE_HUB.search(code)]


def line_matches(expected: str, actual: str) -> bool:
    """`actual` is `expected` up to `...` wildcards and float tolerance (see the module docstring)."""
    pattern, floats, position = "", [], 0
    for piece in EXPECTED_PIECE.finditer(expected):
        pattern += re.escape(expected[position : piece.start()])
        if piece["ellipsis"]:
            pattern += ".*?"
        else:
            pattern += f"({FLOAT})"
            floats.append(float(piece["float"]))
        position = piece.end()
    match = re.fullmatch(pattern + re.escape(expected[position:]), actual)
    return match is not None and all(
        math.isclose(float(value), wanted, rel_tol=1e-3, abs_tol=1e-6) for value, wanted in zip(match.groups(), floats)
    )


def output_matches(expected: str, actual: str) -> bool:
    expected_lines = [line.rstrip() for line in expected.strip("\n").splitlines()]
    actual_lines = [line.rstrip() for line in actual.strip("\n").splitlines()]
    return len(expected_lines) == len(actual_lines) and all(map(line_matches, expected_lines, actual_lines))


@pytest.mark.parametrize(
    ("expected", "actual", "matches"),
    [
        ("tensor([ 1,  9, 18])", "tensor([ 1,  9, 18])", True),
        ("tensor([ 1,  9, 18])", "tensor([ 1,  9, 17])", False),  # integers are exact
        ("6.0123", "6.01234", True),
        ("6.0123", "6.1", False),
        ("tensor(1.1921e-07)", "tensor(2.3842e-07)", True),  # within 1e-6
        ("trainable params: 3,584 || all params: ...", "trainable params: 3,584 || all params: 99,812 || ...", True),
        ("trainable params: 3,584 || all params: ...", "trainable params: 3,585 || all params: 99,812", False),
        ("True 2", "True 2\nFalse", False),  # every line counts
    ],
)
def test_expected_output_convention(expected: str, actual: str, matches: bool) -> None:
    assert output_matches(expected, actual) == matches


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda page: page.name)
def test_doc_examples_print_what_the_page_says(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = runnable_blocks(page)
    if not blocks:
        pytest.skip(f"{page.name} has no runnable example")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for index, (code, expected) in enumerate(blocks):
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(compile(code, str(page), "exec"), namespace)
        printed = stdout.getvalue()
        block = f"{page.name} block {index} ({code.strip().splitlines()[0]!r})"
        if expected is None:
            assert not printed, f"{block} prints but has no ```text block after it:\n{printed}"
        else:
            assert output_matches(expected, printed), f"{block} printed\n{printed}\nbut the page says\n{expected}"
