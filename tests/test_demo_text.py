"""Long-text tab callbacks on the tiny LMs: dense and sparse answers, timings, block-diffusion progress
(blocks, steps, LoSA's stable share); bad parameters become messages."""

import threading

import pytest

from sparsediff.commands.demo import load_app

pytest.importorskip("gradio", reason="the demo needs gradio (the 'demo' extra)")

load_app()
from demos.common import Cancelled, DemoInputError  # noqa: E402
from demos.text import CAUSAL_LM, DIFFUSION_LM, TextRequest, available_models, needle_prompt, run_text  # noqa: E402

needs_dlm = pytest.mark.skipif(DIFFUSION_LM not in available_models(),
                               reason="this transformers has no DiffusionGemma")


@pytest.fixture(scope="module")
def needle():
    return needle_prompt(300, seed=1)


def test_needle_prompt_holds_the_answer(needle):
    from sparsediff.eval.ruler import tokenizer_counter
    from sparsediff.testing.tiny_vlm import tiny_tokenizer

    prompt, answer = needle
    assert answer.isdigit() and answer in prompt
    assert tokenizer_counter(tiny_tokenizer())(prompt) >= 300


@needs_dlm
def test_diffusion_lm_flashblock(needle):
    req = TextRequest(model=DIFFUSION_LM, context=needle[0], method="FlashBlock", sparsity=0.0, gen_length=32,
                      block_length=16, steps_per_block=4)
    result = run_text(req, device="cpu")
    assert result.dense_answer.strip() and result.sparse_answer.strip()
    assert [(r[0], r[1]) for r in result.progress_rows] == [(b, s) for b in range(2) for s in range(4)]
    assert result.progress_rows[-1][4] == 0  # nothing left masked after the last step
    assert "2 blocks x 4 steps" in result.summary_markdown and "speed-up" in result.summary_markdown
    assert result.report["sparse_seconds"] > 0 and 0.0 <= result.report["agreement"] <= 1.0


@needs_dlm
def test_diffusion_lm_losa_reports_stable_tokens(needle):
    req = TextRequest(model=DIFFUSION_LM, context=needle[0], method="LoSA", sparsity=0.5, threshold=10.0,
                      gen_length=16, block_length=16, steps_per_block=4)
    result = run_text(req, device="cpu")
    shares = [r[5] for r in result.progress_rows if r[5] is not None]
    assert shares and all(0.0 <= s <= 1.0 for s in shares)
    assert max(shares) == 1.0  # a huge threshold: after the first step every token is stable
    assert "LoSA" in result.summary_markdown


def test_causal_lm_ba_att(needle):
    req = TextRequest(model=CAUSAL_LM, context=needle[0], method="BA-Att", sparsity=0.0, gen_length=6)
    result = run_text(req, device="cpu")
    # Sparsity 0 keeps every block: the greedy answer equals dense.
    assert result.dense_answer == result.sparse_answer and result.report["agreement"] == 1.0
    assert len(result.progress_rows) == 6


@pytest.mark.parametrize("change, message", [
    (dict(context=""), "prompt is empty"),
    (dict(sparsity=1.2), "[0, 1)"),
    (dict(model="nobody knows"), "unknown model"),
    (dict(model="org/some-llm"), "needs a GPU"),
    (dict(model=CAUSAL_LM, method="LoSA"), "block diffusion"),
    (dict(method="Magic"), "unknown method"),
])
def test_bad_text_inputs_give_messages(change, message):
    with pytest.raises(DemoInputError) as err:
        run_text(TextRequest(**{"context": "some text " * 20, "model": available_models()[0], **change}),
                 device="cpu")
    assert message in str(err.value)


@needs_dlm
def test_block_length_must_divide_answer():
    with pytest.raises(DemoInputError, match="multiple of the block length"):
        run_text(TextRequest(context="x " * 50, gen_length=20, block_length=16), device="cpu")


@needs_dlm
def test_stop_ends_a_text_run(needle):
    flag = threading.Event()
    flag.set()
    with pytest.raises(Cancelled):
        run_text(TextRequest(context=needle[0], method="FlashBlock"), device="cpu", cancel=flag)


def test_text_app_callback_message():
    from demos.app import needle_callback, text_callback

    with pytest.warns(UserWarning):
        out = text_callback(CAUSAL_LM, "", "BA-Att", 0.5, 0.05, 8, 16, 4)
    assert out[0].startswith("**Invalid input:**") and "empty" in out[0]
    prompt, answer = needle_callback(128, 0)
    assert answer in prompt
