"""Tiny random-weight models with offline tokenizers, for tests and smoke runs (``--model tiny-qwen2``,
``--model tiny-qwen2.5-vl``; ``tiny-qwen2-vl`` is the same Qwen2.5-VL under its older name). Outputs are
meaningless; they exercise the real transformers code paths (chat templates, processors, batching,
generate) without downloading anything."""

from __future__ import annotations

import functools

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
           "One of the special magic numbers for calm-anchor is: 1234567. What are all the special magic numbers?",
           "Select the best answer to the following multiple-choice question based on the video. A. B. C. D.",
           "VAR ABCDE = 12345 Question: Find all variables that are assigned the value. The best answer is:"]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE tokenizer (trained in memory) with Qwen's special tokens and a chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_qwen2(seed: int = 0):
    """(model, tokenizer): a 2-layer Qwen2 causal LM with random weights."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config).eval(), tok


def tiny_qwen2_5_vl(seed: int = 0):
    """(model, processor): a 2-layer Qwen2.5-VL with a 1-layer vision tower, random weights. Without
    torchvision the processor has no video processor; the runner then builds video inputs itself."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessorPil,
        Qwen2VLVideoProcessor,
    )

    from ..eval.qwen_video import image_only_processor_class

    tok = tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    pixels = dict(min_pixels=28 * 28, max_pixels=56 * 56)
    try:
        video_processor = Qwen2VLVideoProcessor(**pixels)
    except ImportError:  # transformers' video processors need torchvision: images only without it
        video_processor = None
    cls = Qwen2_5_VLProcessor if video_processor is not None else image_only_processor_class(Qwen2_5_VLProcessor)
    processor = cls(image_processor=Qwen2VLImageProcessorPil(**pixels), video_processor=video_processor,
                    tokenizer=tok, chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), bos_token_id=None, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0],
                           window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval(), processor



tiny_qwen2_vl = tiny_qwen2_5_vl  # the older name
