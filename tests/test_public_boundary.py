"""Property-based tests of the public entry points: whatever a user passes, the answer is a
result or a ``ValueError`` naming the parameter, never a ``TypeError`` / ``IndexError`` /
``RuntimeError`` from deep inside torch.

hypothesis draws arguments of every type (valid and invalid values, wrong types, nesting) for
the config classes, ``TokenTree.parse``, ``generate`` / ``stream`` on a toy pair (table LMs and a
character tokenizer, so thousands of calls take seconds), and ``load_pair`` (with a target that
cannot load, so nothing is ever read from disk or the network).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcsd.api import ModelPair, generate, load_pair, stream
from mcsd.config import SamplingConfig, SpecConfig
from mcsd.models.toy import TableLM
from mcsd.tree import TokenTree

VOCAB = 6
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any value a user might pass by mistake, of many types.
anything = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.binary(max_size=4),
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
trees = st.one_of(
    st.sampled_from(["4,2,2", "1,1,1", "2", "3,1", " 2 , 2 ", "0", "-1", "a,b", "", "()"]),
    st.lists(st.integers(-2, 5), max_size=4),
    st.lists(st.lists(st.integers(-1, 3), max_size=3), max_size=5),
    anything,
)
rules = st.one_of(
    st.none(),
    st.sampled_from(["sps", "mcss", "mcss-wor", "topk", "mcns", "greedy", "kseq", "optimal"]),
    st.sampled_from(["traversal", "typical", "MCSS"]),
    anything,
)
numbers = st.one_of(st.floats(-2, 3), st.integers(-3, 5), anything)


class CharTokenizer:
    """Token i is the letter chr(97 + i); no chat template."""

    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [ord(c) % VOCAB for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i) for i in ids)

    def __len__(self) -> int:
        return VOCAB


@pytest.fixture(scope="module")
def pair() -> ModelPair:
    target = TableLM.random(VOCAB, seed=1)
    draft = TableLM.random(VOCAB, seed=2)
    return ModelPair(target, draft, CharTokenizer(), "target", "draft", (5,))


@SETTINGS
@given(temperature=numbers, top_k=numbers, top_p=numbers)
def test_sampling_config(temperature, top_k, top_p) -> None:
    with contextlib.suppress(ValueError):
        SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)


@SETTINGS
@given(
    tree=trees,
    rule=rules,
    max_new_tokens=numbers,
    seed=st.one_of(st.integers(-5, 10**20), anything),
    stop_strings=st.one_of(st.lists(st.text(max_size=3), max_size=3), anything),
    stop_token_ids=st.one_of(st.none(), st.lists(st.integers(-2, 9), max_size=3), anything),
    max_tree_nodes=numbers,
    target=st.one_of(
        st.just(SamplingConfig(temperature=0.0)), st.just(SamplingConfig(temperature=1.0)), anything
    ),
    draft=st.one_of(st.none(), st.just(SamplingConfig(temperature=0.0)), anything),
)
def test_spec_config(
    tree, rule, max_new_tokens, seed, stop_strings, stop_token_ids, max_tree_nodes, target, draft
) -> None:
    with contextlib.suppress(ValueError):
        SpecConfig(
            tree=tree,
            rule=rule,
            target=target,
            draft=draft,
            max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids,
            stop_strings=stop_strings,
            seed=seed,
            max_tree_nodes=max_tree_nodes,
        )


@SETTINGS
@given(tree=trees, max_nodes=st.one_of(st.none(), st.integers(-1, 50), anything))
def test_token_tree_parse(tree, max_nodes) -> None:
    with contextlib.suppress(ValueError):
        TokenTree.parse(tree, max_nodes=max_nodes)


prompts = st.one_of(
    st.text(max_size=6),
    st.lists(st.integers(-3, VOCAB + 3), max_size=6),
    st.lists(st.booleans(), max_size=3),
    st.lists(st.dictionaries(st.sampled_from(["role", "content"]), anything), max_size=2),
    st.lists(st.one_of(st.text(max_size=4), st.lists(st.integers(-3, VOCAB + 3))), max_size=3),
    anything,
)
specs = st.one_of(
    st.none(),
    st.builds(
        SpecConfig,
        tree=st.sampled_from(["2,2", "1,1", "3"]),
        target=st.sampled_from([SamplingConfig(temperature=0.0), SamplingConfig(temperature=1.0)]),
        max_new_tokens=st.integers(1, 5),
        seed=st.integers(0, 100),
    ),
    anything,
)


@SETTINGS
@given(prompt=prompts, spec=specs, chat=st.booleans())
def test_generate(pair: ModelPair, prompt, spec, chat: bool) -> None:
    try:
        result = generate(pair, prompt, spec, chat=chat)
    except ValueError:
        return
    results = result if isinstance(result, list) else [result]  # a list of prompts: a list
    assert all(0 <= t < VOCAB for r in results for t in r.token_ids)


@SETTINGS
@given(prompt=prompts, spec=specs, bad_pair=st.one_of(anything, st.just(None)))
def test_stream(pair: ModelPair, prompt, spec, bad_pair) -> None:
    for candidate in (pair, bad_pair):
        try:
            for _ in stream(candidate, prompt, spec):
                pass
        except ValueError:
            pass


@settings(max_examples=150, deadline=None)
@given(
    runtime=st.one_of(st.sampled_from(["auto", "hf", "hf-static", "fast", ""]), anything),
    dtype=st.one_of(st.sampled_from(["auto", "float32", "bfloat16", "int4"]), anything),
    device=st.one_of(st.sampled_from(["cpu", "cuda", "cuda:3", "tpu", "cpu:0", ""]), anything),
    compile=st.one_of(st.sampled_from(["none", "draft", "all", "yes"]), anything),
    target=st.one_of(st.just("/nonexistent/model-dir"), anything),
)
def test_load_pair(runtime, dtype, device, compile, target) -> None:
    """Every combination fails (the target cannot load), and always with a ValueError."""
    with pytest.raises(ValueError):
        load_pair(
            target, "/nonexistent/draft", runtime=runtime, dtype=dtype, device=device,
            compile=compile, progress=False,
        )  # fmt: skip


def test_generate_names_the_parameter(pair: ModelPair) -> None:
    """The errors the issue found, each one line naming the parameter."""
    with pytest.raises(ValueError, match="prompt must be text"):
        generate(pair, 123, SpecConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 6\)"):
        generate(pair, [1, 99], SpecConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N"):
        load_pair(device="tpu")
    with pytest.raises(ValueError, match="pair must be a ModelPair"):
        generate("pair", "abc")
    with pytest.raises(ValueError, match="config must be a SpecConfig"):
        generate(pair, "abc", {"tree": "2,2"})
    assert torch.get_num_threads() >= 1
