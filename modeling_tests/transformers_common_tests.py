"""Transformers' own common model tests (`tests/test_modeling_common.py`), fetched from its source distribution.

The wheel ships no tests; the sdist of the installed version ships `tests/*.py` but neither `tests/generation/`
nor `tests/exporters/`, which `test_modeling_common.py` imports. [`import_model_tester_mixin`] downloads the sdist
once (with pip, from whatever package index pip is configured for), caches its top-level test files under
`$XDG_CACHE_HOME/transformers-setok/`, and provides the two missing modules before importing it:

- `generation.test_utils.GenerationTesterMixin`: this suite's own generation mixin ([`generation_tester_mixin`]).
- `exporters.test_export.ExportTesterMixin`: an empty mixin, so no export test runs. `torch.export` needs the
  sequence length to follow from the input shapes; here it follows from how many tokens each image becomes, which
  is data-dependent by design.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import warnings
from pathlib import Path

import pytest
import transformers
from generation_tester_mixin import GenerationTesterMixin

PACKAGE = "transformers_sdist_tests"


class SourcesUnavailable(RuntimeError):
    """The source distribution could not be downloaded (no package index reachable)."""


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "transformers-setok"


def download_sdist(version: str, destination: Path) -> Path:
    """`pip download` the sdist of transformers `version` into `destination`; its path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--no-input",
        "--disable-pip-version-check", "--retries", "1", "--timeout", "20",
        f"transformers=={version}", "-d", str(destination),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    archives = sorted(destination.glob(f"transformers-{version}.tar.gz"))
    if result.returncode != 0 or not archives:
        last_line = (result.stderr.strip().splitlines() or ["pip printed nothing"])[-1]
        raise SourcesUnavailable(
            f"could not download the transformers {version} source distribution (is a package index reachable?): "
            f"{last_line}"
        )
    return archives[0]


def extract_top_level_tests(archive: Path, version: str, package_dir: Path) -> None:
    """Copy `tests/*.py` of the sdist into `package_dir` (made a package), atomically."""
    prefix = f"transformers-{version}/tests/"
    staging = Path(tempfile.mkdtemp(dir=package_dir.parent, prefix=".staging-"))
    with tarfile.open(archive) as sdist:
        for member in sdist.getmembers():
            name = member.name[len(prefix) :] if member.name.startswith(prefix) else ""
            if member.isfile() and name.endswith(".py") and "/" not in name:
                (staging / name).write_bytes(sdist.extractfile(member).read())
    if not (staging / "test_modeling_common.py").is_file():
        raise SourcesUnavailable(f"{archive.name} has no tests/test_modeling_common.py")
    (staging / "__init__.py").touch()
    try:
        staging.rename(package_dir)
    except OSError:  # another test process cached it first
        shutil.rmtree(staging)
        if not (package_dir / "test_modeling_common.py").is_file():
            raise


def sdist_tests_dir(version: str = transformers.__version__) -> Path:
    """The folder holding package `PACKAGE` (the sdist's top-level tests), fetched on first use."""
    root = cache_root() / f"transformers-{version}"
    package_dir = root / PACKAGE
    if not (package_dir / "test_modeling_common.py").is_file():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as download_dir:
            archive = download_sdist(version, Path(download_dir))
            extract_top_level_tests(archive, version, package_dir)
    return root


def register_module(name: str, **attributes: object) -> None:
    """Put a module named `name` holding `attributes` (and its parent packages) into `sys.modules`."""
    parts = name.split(".")
    for depth in range(2, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
    module = sys.modules[name]
    module.__dict__.update(attributes)
    if len(parts) > 2:
        setattr(sys.modules[".".join(parts[:-1])], parts[-1], module)


def import_model_tester_mixin() -> types.ModuleType:
    """`test_modeling_common` of the installed transformers, with its two missing imports provided."""
    root = sdist_tests_dir()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    register_module(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=GenerationTesterMixin)
    register_module(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=type("ExportTesterMixin", (), {}))
    with warnings.catch_warnings():
        # marks such as `flash_attn_3_test` are registered by the conftest.py of the transformers repository
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        return importlib.import_module(f"{PACKAGE}.test_modeling_common")
