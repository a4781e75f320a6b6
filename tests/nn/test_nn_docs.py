"""Every Python block of docs/nn.md, and the README's "Neural MoE layer" block, runs as written (issue 14).

Blocks that call ``init_process_group`` are run as two gloo ranks with torchrun's environment
variables (``conftest.launch_ranks``, bounded by a timeout); the others are executed in a fresh
namespace.
"""

import re
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list:
    return BLOCK.findall(text)


def readme_nn_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Neural MoE layer")
    end = text.index("\n## ", start + 1)
    return text[start:end]


DOC_BLOCKS = python_blocks((ROOT / "docs" / "nn.md").read_text())
README_BLOCKS = python_blocks(readme_nn_section())
CASES = [(f"docs/nn.md#{i}", b) for i, b in enumerate(DOC_BLOCKS)] + [
    (f"README.md#neural-{i}", b) for i, b in enumerate(README_BLOCKS)
]


def test_blocks_were_found():
    assert len(DOC_BLOCKS) >= 3 and len(README_BLOCKS) == 1
    assert sum("init_process_group" in b for b in DOC_BLOCKS) == 1


def test_extraction_finds_fenced_python_only():
    text = "x\n```python\na = 1\n```\n```\nnot python\n```\n```python\nb = 2\n```\n"
    assert python_blocks(text) == ["a = 1\n", "b = 2\n"]


@pytest.mark.parametrize("where, code", CASES, ids=[c[0] for c in CASES])
def test_snippet_runs(where, code, tmp_path, launch):
    if "init_process_group" in code:
        if not dist.is_available() or not dist.is_gloo_available():
            pytest.skip("needs torch.distributed with gloo")
        script = tmp_path / "snippet.py"
        script.write_text(code)
        logs = launch(script, tmp_path)
        for rank, log in enumerate(logs):  # each rank finished and printed its line, rank first
            assert log.strip().splitlines()[-1].startswith(f"{rank} "), logs
        return
    namespace = {"__name__": "__snippet__"}
    exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the documentation is the code under test
