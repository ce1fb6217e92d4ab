"""The kernel peer table: dense peers by name (SageAttention included) and the 8-bit precisions on the same blocks."""

import sys
import types

import pytest
import torch

from sparsediff.commands import bench
from sparsediff.commands.args import precisions


@pytest.fixture
def fake_sage(monkeypatch):
    """A stand-in ``sageattention`` with the real one's in-place key smoothing, so the copy rule is tested."""
    calls = []

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False):
        assert tensor_layout == "HND" and not is_causal
        k -= k.mean(dim=2, keepdim=True)
        calls.append(k)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    monkeypatch.setitem(sys.modules, "sageattention", types.SimpleNamespace(sageattn=sageattn))
    return calls


def test_sage_gets_its_own_keys(fake_sage):
    q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
    k += 1.0
    before = k.clone()
    out = bench.dense_fn(q, k, v, "sage")()
    assert torch.equal(k, before), "the peer must not smooth the shared keys in place"
    assert fake_sage and fake_sage[0] is not k
    # Smoothing keys leaves softmax(q k^T) unchanged: the peer still computes attention on these inputs.
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_grid_records_sage_and_eight_bit_columns(fake_sage, device):
    # The test device: the 8-bit kernel runs on CPU only under the interpreter, which a GPU machine's
    # test process does not use (Triton picks it at import).
    rows = bench.run_grid([128], [0.5], heads=2, dim=32, dtype=torch.float32, device=device, block_size=32,
                          peers=("sdpa", "sage"), precisions=("bf16", "int8"), log=lambda *_: None)
    (row,) = rows
    assert row["sage_ms"] > 0 and row["sdpa_sdpa_ms"] > 0 and row["ours_int8_ms"] > 0
    assert row["int8_x_bf16"] == pytest.approx(row["ours_ms"] / row["ours_int8_ms"])
    assert row["int8_speedup_vs_sage"] == pytest.approx(row["sage_ms"] / row["ours_int8_ms"])
    table = bench.format_table(rows)
    assert "x vs sage" in table and "int8 x bf16" in table and "int8 x vs sage" in table


def test_grid_skips_a_peer_the_machine_lacks(monkeypatch):
    monkeypatch.setitem(sys.modules, "sageattention", None)  # import fails as if not installed
    lines = []
    (row,) = bench.run_grid([64], [1.0], heads=1, dim=16, dtype=torch.float32, device="cpu", block_size=32,
                            peers=("sdpa", "sage"), log=lines.append)
    assert "sage_ms" not in row and "speedup_vs_sdpa" in row
    assert any(line.startswith("  skipping dense sage at N=64: ModuleNotFoundError") for line in lines)


def test_grid_rounds_keep_each_kernels_median(monkeypatch):
    # Every kernel of a cell is timed once per round, in turn; the row keeps the medians.
    calls = []
    fake = iter([1.0, 4.0, 2.0, 8.0, 3.0, 2.0])  # sdpa, ours; three rounds

    def time_ms(fn, device):
        calls.append(fn)
        return next(fake)

    monkeypatch.setattr(bench, "time_ms", time_ms)
    (row,) = bench.run_grid([64], [1.0], heads=1, dim=16, dtype=torch.float32, device="cpu", block_size=32,
                            peers=("sdpa",), rounds=3, log=lambda *_: None)
    assert len(calls) == 6 and calls[0] is calls[2] is calls[4] and calls[1] is calls[3] is calls[5]
    assert row["rounds"] == 3 and row["sdpa_sdpa_ms"] == 2.0 and row["ours_ms"] == 4.0
    assert row["speedup_vs_sdpa"] == pytest.approx(0.5)


def test_table_leaves_per_round_ratios_in_the_json():
    # rounds > 1 keep each round's ratio against cuDNN as a list; the table shows the median ratio only.
    from sparsediff.commands.bench import format_table

    row = {"N": 1024, "D": 64, "density": 0.5, "ours_ms": 1.0, "ours_tflops": 10.0, "speedup_vs_cudnn": 2.0,
           "speedup_vs_cudnn_rounds": [1.9, 2.0, 2.1], "rounds": 3}
    table = format_table([row])
    assert "x vs cudnn |" in table and "cudnn_rounds" not in table and table.rstrip().endswith("| 2.00 |")


def test_precisions_argument_names_what_is_supported():
    assert precisions("bf16,int8_fp8") == ["bf16", "int8_fp8"]
    with pytest.raises(Exception, match="bf16, int8, int8_fp8"):
        precisions("fp4")


def test_cli_names_what_eight_bit_timing_needs_on_cpu(monkeypatch, capsys):
    from sparsediff.cli import main

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # A machine without CUDA: on a GPU machine the command would time the 8-bit kernel on the GPU instead.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--sizes", "256", "--precisions", "bf16,int8"]) == 2
    assert "needs a CUDA GPU, or TRITON_INTERPRET=1 on CPU" in capsys.readouterr().err


def test_table_of_a_gpu_row_with_flex_and_eight_bit_columns():
    """A row as the GPU grid writes it (dense peers, Flex, 8-bit): every ratio has a column; a ratio an older
    JSON lacks prints as '-' instead of failing after the whole grid ran."""
    from sparsediff.commands.bench import format_table

    row = {"N": 16384, "D": 128, "H": 16, "density": 0.5, "ours_ms": 1.67, "ours_tflops": 657.0,
           "speedup_vs_cudnn": 2.18, "speedup_vs_flex": 1.52, "ours_int8_ms": 2.65, "int8_x_bf16": 0.63,
           "int8_speedup_vs_cudnn": 1.38, "int8_speedup_vs_flex": 0.96}
    table = format_table([row])
    assert "int8 x vs flex" in table and "| 0.96 |" in table
    del row["int8_speedup_vs_flex"]
    assert format_table([row]).rstrip().endswith("| - |")
