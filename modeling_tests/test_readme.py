"""README.md's examples run as written and print what it says; its set-up commands stay as CI reads them."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
from conftest import setokim_for
from PIL import Image

from transformers_setok import SetokimProcessor

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"```python\n(?P<code>.*?)```(?:\s*\n```text\n(?P<expected>.*?)```)?", re.S)


def run(code: str, namespace: dict) -> str:
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, str(README), "exec"), namespace)
    return output.getvalue()


def test_first_example_runs_on_the_bundled_samples(
    tiny_processor: SetokimProcessor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, setokim = list(BLOCK.finditer(README.read_text()))[:2]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    assert run(first["code"], namespace) == first["expected"]
    with Image.open(tmp_path / "clutter_tokens.png") as overlay:
        assert overlay.size == (256, 256)

    # The Setokim example, on a tiny saved Setokim in place of "path/to/setokim".
    setokim_for(tiny_processor).save_pretrained(tmp_path / "setokim")
    tiny_processor.save_pretrained(tmp_path / "setokim")
    code = setokim["code"].replace("path/to/setokim", str(tmp_path / "setokim")).replace("=32", "=3")
    assert run(code, namespace).strip()


def test_set_up_commands_are_kept() -> None:
    text = README.read_text()
    assert "\npip install torch==2.13.0 && pip install -e . && setok demo\n" in text
    test_line = 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest modeling_tests -q'
    # .ci/run takes the first line that starts with `pip install` and runs `pytest modeling_tests`.
    commands = [line for line in text.splitlines() if re.match(r"^pip install .* pytest modeling_tests", line)]
    assert commands[0] == test_line
