"""Long-prompt prefill of a Qwen2.5-VL-7B-shaped language model: dense SDPA vs BA-Att through the
transformers integration (``sparsediff.enable``).

    python benchmarks/bench_vlm.py --out bench_vlm.json              # H100: 64k tokens, 4 layers
    python benchmarks/bench_vlm.py --quick                           # CPU smoke run, tiny shapes

Shapes (the 7B text decoder): hidden 3584, 28 query heads, 4 KV heads, head dim 128, intermediate
18944, random weights, bf16; ``--layers`` of them (default 4) prefill ``--tokens`` text embeddings
(default 65536) with ``use_cache=False``. Modes: SDPA, BA-Att at 50% and 80% sparsity. Per mode:
prefill time of the stack, and attention time (one layer's attention call through the same
attention function, on random q/k/v of the layer's shape, times the number of layers), whose ratio
is the attention share. Times are ``triton.testing.do_bench`` medians on CUDA, wall-clock medians on
CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparsediff  # noqa: E402
from sparsediff.commands.bench import environment, time_ms  # noqa: E402
from sparsediff.hooks import SparseAttentionConfig  # noqa: E402
from sparsediff.hooks.attention import BINDING_ATTR, LayerBinding, sparse_attention_forward  # noqa: E402
from sparsediff.methods import make_method  # noqa: E402

FULL = dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944, head_dim=128)
QUICK = dict(hidden_size=224, num_attention_heads=7, num_key_value_heads=1, intermediate_size=512, head_dim=32)
MODES = (("sdpa", None), ("ba_att@0.5", 0.5), ("ba_att@0.8", 0.8))


def build_model(shape, layers, device, dtype):
    import transformers

    cfg = dict(vocab_size=1024, num_hidden_layers=layers, max_position_embeddings=131072, bos_token_id=None,
               eos_token_id=None, **shape)
    if hasattr(transformers, "Qwen2_5_VLTextModel"):  # the VLM's own text stack (M-RoPE = 1-D RoPE for text)
        d = shape["head_dim"]
        section = [d // 8, 3 * d // 16, 3 * d // 16]  # [16, 24, 24] at D = 128, as in the 7B config
        config = transformers.Qwen2_5_VLTextConfig(
            **cfg, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section})
        cls = transformers.Qwen2_5_VLTextModel
    else:
        config, cls = transformers.Qwen2Config(**cfg, rope_theta=1e6), transformers.Qwen2Model
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = cls(config).to(dtype).eval()
    return model


class _Layer(torch.nn.Module):
    """Stands in for one attention layer when timing the attention call alone."""

    def __init__(self, groups):
        super().__init__()
        self.layer_idx, self.is_causal, self.num_key_value_groups = 0, True, groups


def attention_ms(shape, tokens, method, device, dtype):
    heads, kv, d = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    q = torch.randn(1, heads, tokens, d, device=device, dtype=dtype)
    k = torch.randn(1, kv, tokens, d, device=device, dtype=dtype)
    v = torch.randn(1, kv, tokens, d, device=device, dtype=dtype)
    layer = _Layer(heads // kv)
    if method is None:
        from transformers import AttentionInterface

        sdpa = AttentionInterface()["sdpa"]
        return time_ms(lambda: sdpa(layer, q, k, v, None, scaling=d ** -0.5), device)
    setattr(layer, BINDING_ATTR, LayerBinding(method, "bench", SparseAttentionConfig(method=method)))
    return time_ms(lambda: sparse_attention_forward(layer, q, k, v, None, default_name="ba_att",
                                                    scaling=d ** -0.5), device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=None, help="prompt length (default 65536; quick 2048)")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 4; quick 2)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU in fp32 (smoke test)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.quick
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shape = QUICK if args.quick or not cuda else FULL
    tokens = args.tokens or (65536 if shape is FULL else 2048)
    layers = args.layers or (4 if shape is FULL else 2)
    block = 128 if shape is FULL else 64
    env = environment()
    import transformers

    env.update(transformers=transformers.__version__, sparsediff=sparsediff.__version__)
    print(f"device: {env['device']}")
    print("versions: " + ", ".join(f"{k} {env[k]}" for k in ("torch", "transformers", "triton", "sparsediff")
                                   if k in env))
    print(f"shape: {layers} layers x {shape}, {tokens} tokens, {dtype}")

    torch.manual_seed(0)
    model = build_model(shape, layers, device, dtype)
    embeds = torch.randn(1, tokens, shape["hidden_size"], device=device, dtype=dtype)

    def prefill():
        with torch.no_grad():
            return model(inputs_embeds=embeds, use_cache=False).last_hidden_state

    rows = []
    for mode, sparsity in MODES:
        method = None
        if sparsity is not None:
            method = make_method("ba_att", sparsity=sparsity, block_size=block)
            sparsediff.enable(model, method)
        out = prefill()
        finite = bool(torch.isfinite(out).all())
        prefill_time = time_ms(prefill, device)
        with torch.no_grad():
            attn_time = attention_ms(shape, tokens, method, device, dtype) * layers
        sparsediff.disable(model)
        rows.append(dict(mode=mode, sparsity=sparsity or 0.0, prefill_ms=prefill_time, attention_ms=attn_time,
                         attention_share=attn_time / prefill_time, finite=finite))
        if device == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        row["prefill_speedup"] = rows[0]["prefill_ms"] / row["prefill_ms"]
        row["attention_speedup"] = rows[0]["attention_ms"] / row["attention_ms"]

    if args.out:
        Path(args.out).write_text(json.dumps(dict(environment=env, tokens=tokens, layers=layers, shape=shape,
                                                  dtype=str(dtype), rows=rows), indent=2))
        print(f"wrote {args.out}")
    head = ["mode", "prefill ms", "attention ms", "attention share", "prefill x", "attention x", "finite"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['mode']} | {r['prefill_ms']:.1f} | {r['attention_ms']:.1f} | {r['attention_share']:.0%} | "
              f"{r['prefill_speedup']:.2f} | {r['attention_speedup']:.2f} | {r['finite']} |")
    return 0 if all(r["finite"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
