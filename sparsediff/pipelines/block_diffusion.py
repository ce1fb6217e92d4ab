"""A small, readable block-diffusion generation loop (LLaDA / Dream style semi-autoregressive decoding).

The answer is ``gen_length`` mask tokens after the prompt, decoded ``block_length`` tokens at a time.
Each block gets ``steps_per_block`` denoising steps; at every step the model predicts all masked
tokens and the most confident predictions inside the current block are committed (low-confidence
remasking), a fixed number per step, so the block is complete after its last step.

Two ways to drive a model:
  * ``mode="full"``: ``model(x) -> logits (B, L, V)`` over the whole sequence (prompt, finished
    blocks, current block and the still-masked later blocks), bidirectional. SparseD applies here.
  * ``mode="prefix_cache"``: ``model(block_ids, cache=cache) -> logits (B, n, V)`` for the new tokens
    only. In every attention layer the model calls ``k, v = cache.kv(layer, k_new, v_new)`` and gets
    ``[prefix | new]`` (the call convention of FlashBlock and LoSA); positions start at
    ``cache.length``. The prompt is one such call, and each finished block is written into the
    cache by one more call (the *commit pass*) over its final tokens; ``cache.committing`` is True
    during those calls, for models that keep their own KV cache (an adapter can read it).

Step events go through ``step_state`` so method caches hook in: one generation per call,
``new_block(b)`` per block (the prompt pass is block -1), ``denoising_step(i, steps_per_block)`` per
step; the commit pass runs as step ``steps_per_block`` (one past the last denoising step). The
prefix cache is preallocated once (no per-step concatenation), and everything is freed on return:
the cache is dropped and ``reset()`` is called on the ``methods`` given.
"""

from __future__ import annotations

import torch

from ..runtime import step_state


class PrefixCache:
    """Keys and values of committed tokens per layer in buffers of fixed capacity.

    ``kv`` writes the new tokens right after the committed ones and returns a view of
    ``[committed | new]``; ``commit(n)`` makes the last ``n`` written tokens part of the prefix.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.length = 0
        self.committing = False
        self._k: dict = {}
        self._v: dict = {}

    def kv(self, layer, k_new: torch.Tensor, v_new: torch.Tensor):
        n = k_new.shape[2]
        if self.length + n > self.capacity:
            raise ValueError(f"prefix cache capacity {self.capacity} exceeded ({self.length} + {n} tokens)")
        if layer not in self._k:
            shape = (*k_new.shape[:2], self.capacity, k_new.shape[3])
            self._k[layer] = k_new.new_empty(shape)
            self._v[layer] = v_new.new_empty(shape)
        end = self.length + n
        self._k[layer][:, :, self.length : end] = k_new
        self._v[layer][:, :, self.length : end] = v_new
        return self._k[layer][:, :, :end], self._v[layer][:, :, :end]

    def commit(self, n: int) -> None:
        self.length += n

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self._k.values(), *self._v.values()))


def transfer_schedule(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to unmask at each step ``(B, steps)``: an even split, remainder to the first steps
    (LLaDA's ``get_num_transfer_tokens``)."""
    base = masked // steps
    extra = masked % steps
    schedule = base[:, None].repeat(1, steps)
    schedule += (torch.arange(steps, device=masked.device)[None, :] < extra[:, None]).long()
    return schedule


def _logits(out):
    return getattr(out, "logits", out)


def _predict(logits, temperature, generator, mask_id):
    """Predicted tokens and their confidence (softmax probability of the prediction)."""
    logits = logits.float().clone()
    logits[..., mask_id] = float("-inf")  # committing the mask token would leave the position masked
    if temperature > 0:
        # Gumbel-max sampling at the given temperature, as LLaDA does.
        u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-20, 1.0)
        tokens = torch.argmax(logits / temperature - torch.log(-torch.log(u)), dim=-1)
    else:
        tokens = torch.argmax(logits, dim=-1)
    confidence = torch.gather(torch.softmax(logits, dim=-1), -1, tokens[..., None])[..., 0]
    return tokens, confidence


def _unmask(block, logits, count, mask_id, temperature, generator):
    """Commit the ``count[b]`` most confident predictions among the masked tokens of ``block``."""
    tokens, confidence = _predict(logits, temperature, generator, mask_id)
    masked = block == mask_id
    confidence = torch.where(masked, confidence, float("-inf"))
    order = torch.argsort(confidence, dim=-1, descending=True, stable=True)  # ties: the earlier position
    chosen = torch.arange(block.shape[1], device=block.device)[None, :] < count[:, None]
    commit = torch.zeros_like(masked).scatter_(1, order, chosen) & masked
    return torch.where(commit, tokens, block)


def _commit(model, ids, cache):
    cache.committing = True
    try:
        model(ids, cache=cache)
    finally:
        cache.committing = False
    cache.commit(ids.shape[1])


@torch.no_grad()
def generate(model, prompt_ids: torch.Tensor, *, mask_id: int, gen_length: int = 128, block_length: int = 32,
             steps_per_block: int = 8, mode: str = "full", temperature: float = 0.0, methods=(),
             generator: torch.Generator | None = None, on_step=None) -> torch.Tensor:
    """Generate ``gen_length`` tokens after ``prompt_ids`` ``(B, P)``; returns ``(B, P + gen_length)``.

    ``methods``: attention methods whose caches are freed at the end. ``on_step(block, step, x)`` is
    called after every denoising step (for tracing).
    """
    if mode not in ("full", "prefix_cache"):
        raise ValueError(f"mode must be 'full' or 'prefix_cache', got {mode!r}")
    if gen_length % block_length:
        raise ValueError(f"gen_length ({gen_length}) must be a multiple of block_length ({block_length})")
    if steps_per_block < 1 or steps_per_block > block_length:
        raise ValueError(f"steps_per_block must lie in [1, block_length={block_length}], got {steps_per_block}")
    bsz, prompt_len = prompt_ids.shape
    x = torch.full((bsz, prompt_len + gen_length), mask_id, dtype=torch.long, device=prompt_ids.device)
    x[:, :prompt_len] = prompt_ids
    cache = PrefixCache(prompt_len + gen_length) if mode == "prefix_cache" else None
    try:
        with step_state.generation():
            if cache is not None and prompt_len:
                step_state.new_block(-1)
                with step_state.denoising_step(0, 1):
                    _commit(model, x[:, :prompt_len], cache)
            for b in range(gen_length // block_length):
                start = prompt_len + b * block_length
                end = start + block_length
                step_state.new_block(b)
                schedule = transfer_schedule((x[:, start:end] == mask_id).sum(dim=1), steps_per_block)
                for i in range(steps_per_block):
                    with step_state.denoising_step(i, steps_per_block):
                        if cache is None:
                            logits = _logits(model(x))[:, start:end]
                        else:
                            logits = _logits(model(x[:, start:end], cache=cache))
                    x[:, start:end] = _unmask(x[:, start:end], logits, schedule[:, i], mask_id, temperature,
                                              generator)
                    if on_step is not None:
                        on_step(b, i, x)
                if cache is not None:
                    with step_state.denoising_step(steps_per_block, steps_per_block):
                        _commit(model, x[:, start:end], cache)  # the block's final keys/values
    finally:
        del cache
        for method in methods:
            method.reset()
    return x
