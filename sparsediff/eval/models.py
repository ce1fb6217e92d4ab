"""Model adapters for the runner. A ``ModelRunner`` answers prepared samples with text and switches
attention methods; the runner never touches a model directly.

- ``VLMRunner``: transformers vision-language models in the Qwen2.5-VL style (processor + generate).
- ``CausalLMRunner``: transformers causal LMs (RULER), with the chat template when the tokenizer has one.
- ``GenerateFnRunner``: any ``generate(prompts, max_new_tokens) -> texts`` callable, e.g. a diffusion
  LM's sampling loop (DiffusionGemma) that has no ``model.generate``.
- ``FakeRunner``: a deterministic stand-in for tests and dry runs.

Methods are applied with ``sparsediff.enable(model, method)`` and removed with ``disable``; "dense" is
the model's own attention, untouched, so it is the honest baseline for speed and for accuracy.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


def _sync(model=None) -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class ModelRunner:
    """Base: ``answer_batch(items) -> texts``, ``set_method(spec)``; ``model`` is what methods patch."""

    model = None
    max_batch_size = 1  # how many prepared samples one generate call may take
    # Config fields every method of this runner gets unless its spec sets them (tiny models: short sequences).
    method_defaults: dict = {}

    def __init__(self):
        self._methods: dict[str, object] = {}
        self._active: str | None = None

    def answer(self, item) -> str:
        raise NotImplementedError

    def answer_batch(self, items) -> list[str]:
        return [self.answer(item) for item in items]

    def set_method(self, spec: str) -> None:
        """Make ``spec`` the active attention method ("dense" = the model's own attention)."""
        if spec == self._active or (spec == "dense" and self._active is None):
            return
        if self._active is not None:
            self._disable()
            self._active = None
        if spec != "dense":
            self._enable(spec)
            self._active = spec

    def _method(self, spec):
        if spec not in self._methods:  # one object per spec: its per-layer caches survive across batches
            from ..methods import make_method
            from ..methods.base import parse_spec

            _, own = parse_spec(spec)
            defaults = {k: v for k, v in self.method_defaults.items() if k not in own}
            self._methods[spec] = make_method(spec, **defaults)
        return self._methods[spec]

    def _enable(self, spec) -> None:
        if self.model is None:
            raise ValueError(f"{type(self).__name__} has no model to apply method {spec!r} to")
        try:
            from ..api import enable
        except ImportError as err:
            raise RuntimeError(f"cannot apply {spec!r}: sparsediff's model hooks are not installed ({err})") from err
        enable(self.model, self._method(spec))

    def _disable(self) -> None:
        from ..api import disable

        disable(self.model)

    def close(self) -> None:
        if self._active is not None:
            self._disable()
            self._active = None


def _dtype(name):
    import torch

    return {"auto": "auto", "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
            "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[name]


def _default_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class _HFGenerate(ModelRunner):
    """Shared greedy ``generate`` call and new-token decoding."""

    def _generate(self, inputs, max_new_tokens: int) -> list[str]:
        import torch

        inputs = inputs.to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=self.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]  # left padding: the prompt ends at the same column
        return [t.strip() for t in self.decoder.batch_decode(new, skip_special_tokens=True)]


class CausalLMRunner(_HFGenerate):
    def __init__(self, model_id=None, *, model=None, tokenizer=None, dtype="auto", device=None,
                 attn_implementation=None, batch_size: int = 1, chat_template: bool = True):
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_id)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        self.model = model or AutoModelForCausalLM.from_pretrained(model_id, dtype=_dtype(dtype), **kwargs)
        if model is None:
            self.model.to(device or _default_device())
        self.model.eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_token_id = self.tokenizer.pad_token_id
        self.decoder = self.tokenizer
        self.max_batch_size = batch_size
        self.chat_template = chat_template and bool(getattr(self.tokenizer, "chat_template", None))

    def format(self, item) -> str:
        prefix = item.sample.answer_prefix
        if not self.chat_template:
            return item.text + prefix
        messages = [{"role": "user", "content": item.text}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + prefix.lstrip()  # the answer starts right after the assistant tag

    def answer_batch(self, items) -> list[str]:
        texts = [self.format(i) for i in items]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not self.chat_template)
        return self._generate(inputs, max(i.sample.max_new_tokens for i in items))

    def answer(self, item) -> str:
        return self.answer_batch([item])[0]


class VLMRunner(_HFGenerate):
    """Qwen2.5-VL style: chat template with image/video placeholders, processor, greedy generate."""

    def __init__(self, model_id=None, *, model=None, processor=None, dtype="auto", device=None,
                 attn_implementation=None, batch_size: int = 1):
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.video_settings = None  # set when the processor came without its video processor
        if processor is None:
            try:
                processor = AutoProcessor.from_pretrained(model_id)
            except ImportError as err:  # transformers' video processors need torchvision
                if "torchvision" not in str(err).lower():
                    raise
                from .qwen_video import load_processor_without_video

                processor, self.video_settings = load_processor_without_video(model_id)
        self.processor = processor
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        self.model = model or AutoModelForImageTextToText.from_pretrained(model_id, dtype=_dtype(dtype), **kwargs)
        if model is None:
            self.model.to(device or _default_device())
        self.model.eval()
        tok = self.processor.tokenizer
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.pad_token_id = tok.pad_token_id
        self.decoder = tok
        self.max_batch_size = batch_size

    def format(self, item) -> str:
        content = [{"type": "image"} for _ in item.images]
        if item.video is not None:
            content.append({"type": "video"})
        content.append({"type": "text", "text": item.text})
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
            + item.sample.answer_prefix

    def answer_batch(self, items) -> list[str]:
        texts = [self.format(i) for i in items]
        images = [img for i in items for img in i.images] or None
        frames = [i.video for i in items if i.video is not None]
        if frames and getattr(self.processor, "video_processor", None) is None:
            from . import qwen_video  # torchvision missing: the same inputs, built with torch only

            qwen_video.warn_once()
            inputs = qwen_video.build_inputs(self.processor, texts, images, frames, self.video_settings)
        elif frames:
            # Frames are already sampled: the processor must not resample, and needs their timing.
            inputs = self.processor(text=texts, images=images, videos=[f.array for f in frames], padding=True,
                                    return_tensors="pt", video_metadata=[f.metadata() for f in frames],
                                    do_sample_frames=False)
        else:
            inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        return self._generate(inputs, max(i.sample.max_new_tokens for i in items))

    def answer(self, item) -> str:
        return self.answer_batch([item])[0]


class GenerateFnRunner(ModelRunner):
    """Wraps ``generate(prompts: list[str], max_new_tokens: int) -> list[str]``; ``model`` (optional) is
    what methods are enabled on. Prompts are the sample text followed by its answer prefix."""

    def __init__(self, generate, model=None, batch_size: int = 1):
        super().__init__()
        self.generate = generate
        self.model = model
        self.max_batch_size = batch_size

    def answer_batch(self, items) -> list[str]:
        prompts = [i.text + i.sample.answer_prefix for i in items]
        out = list(self.generate(prompts, max(i.sample.max_new_tokens for i in items)))
        if len(out) != len(prompts):
            raise ValueError(f"generate returned {len(out)} texts for {len(prompts)} prompts")
        return [str(o) for o in out]

    def answer(self, item) -> str:
        return self.answer_batch([item])[0]


class FakeRunner(ModelRunner):
    """Answers from the gold answer, as a chatty model would phrase it, except on every ``wrong_every``-th
    sample under a sparse method; ``fail_after`` raises after that many answers (tests resume), ``delay``
    sleeps per answer (tests killing a run)."""

    def __init__(self, wrong_every: int = 0, fail_after: int | None = None, delay: float = 0.0, batch_size: int = 1):
        super().__init__()
        self.wrong_every, self.fail_after, self.delay = wrong_every, fail_after, delay
        self.max_batch_size = batch_size
        self.calls: list[tuple[str, str]] = []  # (method, sample id)

    def _enable(self, spec) -> None:
        pass

    def _disable(self) -> None:
        pass

    def answer(self, item) -> str:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError(f"injected failure after {self.fail_after} answers")
        if self.delay:
            time.sleep(self.delay)
        method = self._active or "dense"
        self.calls.append((method, item.sample.id))
        answer = item.sample.answer
        number = sum(map(ord, item.sample.id))  # stable, unlike hash()
        if method != "dense" and self.wrong_every and number % self.wrong_every == 0:
            return "I am not sure."
        if isinstance(answer, list):
            return ", ".join(answer)
        return f"The answer is ({answer})." if len(str(answer)) == 1 else str(answer)


def time_batch(runner: ModelRunner, items) -> tuple[list[str], float]:
    """Answers and wall seconds per sample (synchronised, so GPU work is counted)."""
    _sync()
    start = time.perf_counter()
    texts = runner.answer_batch(items)
    _sync()
    return texts, (time.perf_counter() - start) / max(1, len(items))
