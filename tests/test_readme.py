"""The README's kernel example runs as written (on CPU through the PyTorch path)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_kernel_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    kernel = [b for b in blocks if "block_sparse_attention(q, k, v" in b]
    assert kernel, "the README lost its kernel example"
    exec(compile(kernel[0], "README.md", "exec"), {})
    assert "torch.Size([1, 16, 8192, 128]) torch.Size([1, 16, 8192])" in capsys.readouterr().out
