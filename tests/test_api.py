"""The Python API and ``mcsd generate`` on a small real model (SmolLM2-135M as its own draft).

Covers prompt forms (text, chat messages, ids), streaming, stop strings, EOS, and the bad
inputs a user can give: each must be one clear error, never a stack trace from torch.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_dtype, greedy_reference

from mcsd import cli
from mcsd.api import (
    ModelPair,
    check_same_tokenizer,
    encode_prompt,
    generate,
    load_model,
    load_pair,
    stream,
)
from mcsd.config import GREEDY, SamplingConfig, SpecConfig

SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def pair():
    # float32 target, bfloat16 draft: the same weights at two precisions make a real draft.
    target, tokenizer, eos = load_model(SMOL, dtype="float32", device="cpu", progress=False)
    draft, _, _ = load_model(SMOL, dtype=cpu_dtype(), device="cpu", progress=False)
    if cpu_dtype() == "float32":
        # No native bf16 here (emulated, several times slower): a float32 draft whose weights
        # are off by bf16's relative step (2^-8) in a seeded direction, a close, imperfect draft
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for weight in draft.hf_model.parameters():
                noise = torch.randn(weight.shape, generator=generator)
                weight.mul_(1 + 2**-8 * noise)
    return ModelPair(target, draft, tokenizer, SMOL, SMOL, eos)


def test_greedy_text_prompt_matches_target_generate(pair) -> None:
    result = generate(
        pair, "def reverse(s):", SpecConfig(tree="2,2,2", target=GREEDY, max_new_tokens=24)
    )
    reference = greedy_reference(
        pair.target.hf_model, result.prompt_ids, 24, eos=pair.eos_token_ids
    )
    assert result.token_ids == reference
    assert result.stats.steps < len(result.token_ids)  # speculation accepted something


@pytest.mark.parametrize("tree", ["dynamic:8:3:4", "none"])
def test_dynamic_tree_and_no_speculation_match_target_generate(pair, tree: str) -> None:
    """A tree grown per step, and tree "none" (what mcsd tune saves when no tree pays: the
    target alone), both give the target's greedy output."""
    spec = SpecConfig(tree=tree, target=GREEDY, max_new_tokens=24)
    result = generate(pair, "def reverse(s):", spec)
    reference = greedy_reference(
        pair.target.hf_model, result.prompt_ids, 24, eos=pair.eos_token_ids
    )
    assert result.token_ids == reference
    if tree == "none":
        assert result.stats.steps == len(result.token_ids)
    else:
        assert result.stats.steps < len(result.token_ids)


def test_stream_chunks_add_up_to_generate(pair) -> None:
    spec = SpecConfig(tree="3,1", target=SamplingConfig(temperature=0.8), max_new_tokens=20, seed=5)
    chunks = [chunk for chunk, _ in stream(pair, "Once upon a time", spec)]
    whole = generate(pair, "Once upon a time", spec)
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.token_ids] == whole.token_ids
    ended = "stop" if whole.token_ids[-1] in pair.eos_token_ids else "length"
    assert chunks[-1].finish_reason == whole.finish_reason == ended
    assert ended == "stop" or len(whole.token_ids) == 20
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_chat_messages_stop_at_eos(pair) -> None:
    messages = [{"role": "user", "content": "What is 2 + 2? Answer with one number."}]
    result = generate(pair, messages, SpecConfig(target=GREEDY, max_new_tokens=64))
    assert result.finish_reason == "stop"
    assert result.token_ids[-1] in pair.eos_token_ids  # EOS kept, nothing after it
    assert "4" in result.text


def test_stop_string_cuts_text_and_tokens(pair) -> None:
    spec = SpecConfig(target=GREEDY, max_new_tokens=60, stop_strings=("return",))
    result = generate(pair, "def add(a, b):\n", spec)
    free = generate(pair, "def add(a, b):\n", SpecConfig(target=GREEDY, max_new_tokens=60))
    assert "return" in free.text
    assert result.finish_reason == "stop"
    assert result.text == free.text[: free.text.index("return")]
    # Tokens stop at the one completing the stop string.
    assert result.stats.new_tokens == len(result.token_ids)
    decoded = pair.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert "return" in decoded and "return" not in pair.tokenizer.decode(result.token_ids[:-1])


def test_prompt_ids_and_max_new_tokens(pair) -> None:
    ids = encode_prompt(pair.tokenizer, "Hello")
    result = generate(pair, ids, SpecConfig(target=GREEDY, max_new_tokens=5))
    assert result.prompt_ids == ids
    assert len(result.token_ids) == 5 and result.finish_reason == "length"


@pytest.mark.parametrize("prompt", ["", [], [{"role": "user"}], [1.5, 2]])
def test_bad_prompts(pair, prompt) -> None:
    with pytest.raises(ValueError, match=r"prompt|role"):
        generate(pair, prompt, SpecConfig(max_new_tokens=4))


def test_prompt_longer_than_context(pair) -> None:
    context = pair.target.max_context
    with pytest.raises(ValueError, match=f"model context of {context}"):
        generate(pair, [1] * (context + 5), SpecConfig(max_new_tokens=4))


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="known"):
        load_pair("no-such-model", SMOL)


def test_different_tokenizers_are_refused(pair) -> None:
    from transformers import AutoTokenizer

    from mcsd.sources import resolve

    qwen_like = AutoTokenizer.from_pretrained(resolve(SMOL, progress=False))
    qwen_like.add_tokens(["<extra-token>"])
    with pytest.raises(ValueError, match="different tokenizers"):
        check_same_tokenizer(pair.tokenizer, qwen_like)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tree", "0,2"], "k_1"),
        (["--rule", "sps", "--tree", "2,2", "--temperature", "1"], "sps"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "1.5"], "top_p"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--temperature", "1", "--draft-temperature", "0", "--rule", "mcss"], "topk"),
        (["--tree", "dynamic:0"], "budget must be an integer >= 1"),
        (["--tree", "dynamic:8", "--rule", "mcss"], "cannot verify dynamic trees"),
        (["--tree", "none", "--rule", "mcss"], "verifies nothing"),
    ],
)
def test_cli_rejects_bad_options_before_loading(argv, message, capsys) -> None:
    code = cli.main(["generate", "hello", "--target", "no-such-model", *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_static_cache_pair_matches_the_dynamic_one(pair) -> None:
    static = load_pair(
        SMOL, SMOL, dtype="float32", device="cpu", runtime="hf-static", progress=False
    )
    from mcsd.models.static import StaticHFModel

    assert isinstance(static.target, StaticHFModel) and isinstance(static.draft, StaticHFModel)
    spec = SpecConfig(tree="2,1", target=GREEDY, max_new_tokens=12)
    expected = generate(pair, "def add(a, b):", spec)  # greedy: the fp32 target's own output
    assert generate(static, "def add(a, b):", spec).token_ids == expected.token_ids


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"compile": "draft"}, "compile needs a runtime that compiles"),
        ({"compile": "yes", "runtime": "hf-static"}, "compile must be one of none, draft, all"),
        ({"runtime": "fastest"}, "runtime must be one of auto, fast, llama.cpp, hf, hf-static"),
    ],
)
def test_load_pair_rejects_bad_fast_path_options(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        load_pair(SMOL, SMOL, **kwargs)


def test_load_model_rejects_compile_without_static_cache() -> None:
    with pytest.raises(ValueError, match="compile needs a runtime that compiles"):
        load_model(SMOL, compile=True)
    with pytest.raises(ValueError, match="max_length sizes a static cache"):
        load_model(SMOL, max_length=256)


def test_cli_generate_json(capsys) -> None:
    code = cli.main(
        [
            "generate",
            "def f(x):",
            "--target",
            SMOL,
            "--draft",
            SMOL,
            "--max-new-tokens",
            "6",
            "--json",
        ]
    )
    assert code == 0
    import json

    out = json.loads(capsys.readouterr().out)
    assert len(out["token_ids"]) == 6 and out["stats"]["steps"] >= 1


def test_list_of_prompts_equals_each_prompt_alone(pair) -> None:
    """Three prompts of different lengths through two rows (the third joins when a row frees),
    greedy with a stop string: each result as if it ran alone. (Seeded sampling is checked
    row for row on tiny models, tests/test_engine_batch.py: with a 49k vocabulary the last-bit
    rounding differences of batched kernels move an occasional draw.)"""
    prompts = ["def add(a, b):\n", "Once upon a time", [{"role": "user", "content": "Hi"}]]
    spec = SpecConfig(tree="2,2", target=GREEDY, max_new_tokens=10, stop_strings=("\n\n",))
    alone = [generate(pair, p, spec) for p in prompts]
    together = generate(pair, prompts, spec, batch_size=2)
    assert isinstance(together, list)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.finish_reason for r in together] == [r.finish_reason for r in alone]


def test_stream_over_prompts_yields_index_and_chunk(pair) -> None:
    spec = SpecConfig(tree="2,2", target=GREEDY, max_new_tokens=8)
    prompts = ["Once upon a time", "def f(x):"]
    texts = ["", ""]
    finished = set()
    for index, chunk, stats in stream(pair, prompts, spec):
        texts[index] += chunk.text
        if chunk.finish_reason is not None:
            finished.add(index)
            assert stats.new_tokens == 8
    assert finished == {0, 1}
    assert texts == [generate(pair, p, spec).text for p in prompts]


def test_one_row_runtime_refuses_more_rows() -> None:
    from mcsd.models.base import with_rows

    class OneRowRuntime:
        name, batch_size = "one-row:tiny", 1

    with pytest.raises(ValueError, match=r"batch_size: runtime one-row:tiny holds one row"):
        with_rows(OneRowRuntime(), 4)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        with_rows(OneRowRuntime(), 0)  # type: ignore[arg-type]
