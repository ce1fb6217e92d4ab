"""The README's kernel, method and step-reuse examples run as written (on CPU through the PyTorch path)."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_kernel_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    kernel = [b for b in blocks if "block_sparse_attention(q, k, v" in b]
    assert kernel, "the README lost its kernel example"
    exec(compile(kernel[0], "README.md", "exec"), {})
    assert "torch.Size([1, 16, 8192, 128]) torch.Size([1, 16, 8192])" in capsys.readouterr().out


def test_readme_method_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "ba_attention(p.q" in b]
    assert blocks, "the README lost its method example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    error = float(capsys.readouterr().out.strip().rsplit(" ", 1)[-1])
    assert error < 0.1  # structured (video-like) inputs at 50 % sparsity stay close to dense


def test_readme_step_reuse_example_runs(capsys):
    from sparsediff.testing.tiny_lm import has_diffusion_gemma

    text = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "denoising_step(i" in b]
    assert blocks, "the README lost its step-reuse example"
    if not has_diffusion_gemma():
        pytest.skip("this transformers has no DiffusionGemma (transformers.models.diffusion_gemma)")
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    sparsed, flash = (ast.literal_eval(line) for line in capsys.readouterr().out.strip().splitlines())
    assert sparsed["selections"] == 1 and sparsed["sparse_calls"] == 7  # 10 steps: 2 dense, 1 selects, 7 reuse
    assert flash["cached_calls"] > flash["refreshes"] > 0
    assert scope["ids"].shape == (1, 96) and not bool((scope["ids"] == 63).any())
