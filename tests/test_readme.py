"""Every ```python block of README.md runs as copied, so the snippets cannot rot.

Each block runs in a fresh namespace (``__name__ == "__main__"``), in a temporary working directory
(files a snippet saves land there), on whatever device the machine has: the snippets pick
``cuda`` when it is available, else ``cpu``. Any exception fails the test, and the traceback
points at the README line. Blocks are found by their fence (```` ```python ````), so sections
added later are picked up without touching this file; keep their sizes small (the whole file
runs in seconds on a CPU).

A block that imports an optional third-party package which is not installed (say
``transformers``) is skipped with that reason; a missing ``chunkmem``, ``torch`` or ``numpy``
module is a failure.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
REQUIRED_MODULES = {"chunkmem", "torch", "numpy"}
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


def python_blocks(text: str) -> list[tuple[int, str, str]]:
    """(first code line number, nearest heading, code) of every fenced block tagged python."""
    blocks, heading, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            if lines[i].startswith("#"):
                heading = lines[i].lstrip("#").strip()
            i += 1
            continue
        fence, info, start = m["fence"], m["info"].lower(), i + 1
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence[0] * len(fence)):
            i += 1
        if info in ("python", "py", "python3"):
            indent = len(m["indent"])
            code = "\n".join(line[indent:] if line[:indent].isspace() else line
                             for line in lines[start:i])
            blocks.append((start + 1, heading, code))
        i += 1  # the closing fence
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def _id(block):
    line, heading, _ = block
    slug = re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")[:40]
    return f"L{line}-{slug}"


def test_readme_has_python_snippets():
    assert len(BLOCKS) >= 2, "README.md should show the op and the model as ```python blocks"


def test_block_parser():
    text = "# A\n```python\nx = 1\n```\n## B\n```bash\nls\n```\n  ```py\n  y = 2\n  ```\n````python\nz = '```'\n````\n"
    assert python_blocks(text) == [(3, "A", "x = 1"), (10, "B", "y = 2"), (13, "B", "z = '```'")]


@pytest.mark.parametrize("block", BLOCKS, ids=[_id(b) for b in BLOCKS])
def test_readme_snippet_runs(block, tmp_path, monkeypatch):
    line, _, code = block
    monkeypatch.chdir(tmp_path)
    # blank lines in front: a traceback's line numbers are README.md's
    compiled = compile("\n" * (line - 1) + code, str(README), "exec")
    namespace = {"__name__": "__main__", "__file__": str(tmp_path / "snippet.py")}
    try:
        exec(compiled, namespace)
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if not top or top in REQUIRED_MODULES:
            raise
        pytest.skip(f"README.md line {line}: optional package {exc.name!r} is not installed")


def _bash_lines(text: str) -> list[str]:
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = line.strip() in ("```bash", "```sh", "```shell")
            continue
        if inside:
            lines.append(line.strip())
    return lines


def test_ci_runs_the_readme_test_command():
    """.ci/run runs the README's test command (``-q`` flags aside), so CI tests what users run."""
    def words(line):
        return [w for w in line.split() if w != "-q"]
    readme_cmds = [words(l) for l in _bash_lines(README.read_text(encoding="utf-8")) if "pytest" in l]
    assert readme_cmds, "README.md should show the test command in a ```bash block"
    ci = [words(l) for l in (README.parent / ".ci" / "run").read_text().splitlines()]
    for cmd in readme_cmds:
        assert cmd in ci, f"README's test command {' '.join(cmd)!r} is not in .ci/run"
