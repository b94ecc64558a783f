"""The wheel as users get it: SPDX license metadata, the LICENSE file inside, numpy declared,
only the `mla` package installed, and a build that prints no setuptools deprecation warning
(setuptools stops building deprecated metadata such as a TOML-table `license` in 2027).

The wheel is built offline, on a copy of the source tree, by setuptools' own PEP 517 backend
with the setuptools installed here: `pip wheel .` does the same in an isolated environment,
which would need an index.
"""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Not part of a build: version control, environments, caches, earlier build outputs, bench data.
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks",
    "results", "weights",
)  # fmt: skip
BUILD = "import sys, setuptools.build_meta as backend; print(backend.build_wheel(sys.argv[1]))"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[zipfile.ZipFile, str]:
    """(the built wheel, everything the build printed)."""
    tree = tmp_path_factory.mktemp("source") / "mla-latent"
    shutil.copytree(REPO, tree, ignore=NOT_SOURCE)
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-W", "default", "-c", BUILD, str(out)], cwd=tree, capture_output=True,
                           text=True, timeout=300, check=False)  # fmt: skip
    printed = build.stdout + build.stderr
    assert build.returncode == 0, printed
    with zipfile.ZipFile(out / build.stdout.splitlines()[-1]) as whl:
        yield whl, printed


def _metadata(whl: zipfile.ZipFile):
    (name,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
    return email.parser.Parser().parsestr(whl.read(name).decode())


def test_build_prints_no_setuptools_warning(wheel):
    _, printed = wheel
    assert "SetuptoolsDeprecationWarning" not in printed and "SetuptoolsWarning" not in printed, printed


def test_license_is_an_spdx_expression_with_its_file(wheel):
    whl, _ = wheel
    meta = _metadata(whl)
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["License"] is None, "the deprecated free-text License field is still written"
    (license_file,) = [n for n in whl.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
    assert whl.read(license_file) == (REPO / "LICENSE").read_bytes()
    assert b"Apache License\n                           Version 2.0, January 2004" in whl.read(license_file)


def test_numpy_is_a_dependency(wheel):
    """torch's CPU wheel does not pull numpy in, and torch warns at import without it."""
    whl, _ = wheel
    requires = [r for r in _metadata(whl).get_all("Requires-Dist") if "extra ==" not in r]
    assert any(r.replace(" ", "").startswith("numpy>=") for r in requires), requires


def test_only_the_mla_package_is_installed(wheel):
    """kernels/ and reference/ install as mla.kernels and mla.reference; no top-level `kernels`,
    `reference`, `bench` or `tests` (PyPI names that belong to other projects)."""
    whl, _ = wheel
    top = {n.split("/")[0] for n in whl.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"mla"}, top
    assert {"mla/kernels/decode.py", "mla/reference/decode.py", "mla/speculative/loop.py", "mla/conformance/__main__.py"} <= set(whl.namelist())
