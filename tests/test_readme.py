"""README.md stays true: every ```python block runs as pasted, and the set-up commands are the
ones CI runs.

Each block runs in a fresh interpreter from the repository root (the shipped-model example
imports the repository's bench/), with TRITON_INTERPRET removed from its environment: a block
that needs the Triton kernel on a CPU has to set it itself, as a reader's would. A block must
also print nothing to stderr (a warning in an example is a bug in the example or the library).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
# CPU wheel index: `torch==2.13.0` then resolves to 2.13.0+cpu (see the README's Set up)
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _section(text: str, title: str) -> str:
    """The text under the `## title` heading, up to the next heading of level 2."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def python_blocks(text: str) -> list[pytest.param]:
    """One param per ```python block, its id the slug of the heading above it (-2, -3 for a
    heading's later blocks)."""
    params, seen, heading = [], {}, "top"
    # headings and whole fenced blocks, in order (a "# comment" inside a block is no heading)
    for match in re.finditer(r"^#{1,6} ([^\n]*)$|^```(\w*)\n(.*?)^```$", text, flags=re.MULTILINE | re.DOTALL):
        if match.group(1) is not None:
            heading = re.sub(r"[^a-z0-9]+", "-", match.group(1).lower()).strip("-")
        elif match.group(2) == "python":
            seen[heading] = seen.get(heading, 0) + 1
            suffix = f"-{seen[heading]}" if seen[heading] > 1 else ""
            params.append(pytest.param(match.group(3), id=heading + suffix))
    return params


BLOCKS = python_blocks(README)


@pytest.fixture(scope="module")
def started():
    """Every block's process, all started at once: most of each run is interpreter and torch
    start-up, which overlaps well, and the blocks are independent by construction."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {
        block.id: subprocess.Popen([sys.executable, "-c", block.values[0]], cwd=REPO, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for block in BLOCKS
    }  # fmt: skip
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("code", BLOCKS)
def test_python_block_runs_as_pasted(code, started, request):
    proc = started[request.node.callspec.id]
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert stderr == "", stderr[-3000:]


def _pip_install(command: str) -> list[str]:
    """The arguments of the `pip install` in a shell command line, -q dropped."""
    for part in command.split("&&"):
        words = shlex.split(part)
        if words[:2] == ["pip", "install"]:
            return [w for w in words[2:] if w != "-q"]
    raise AssertionError(f"no pip install in {command!r}")


def test_setup_is_two_commands_on_the_cpu_wheel_and_ci_runs_the_second():
    commands = re.findall(r"^```\n(.*?)\n^```$", _section(README, "Set up"), flags=re.MULTILINE | re.DOTALL)
    assert len(commands) == 2, commands
    bench, tests = (_pip_install(c) for c in commands)
    assert commands[0].endswith("python -m bench") and commands[1].endswith("python -m pytest"), commands
    for args in (bench, tests):
        assert "torch==2.13.0" in args and args[args.index("--extra-index-url") + 1] == CPU_INDEX, args
    ci = next(line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("pip install"))
    assert _pip_install(ci) == tests
