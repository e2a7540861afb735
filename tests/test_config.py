"""Tests of mcsd.config: validation messages name the parameter, rule defaults, invalid combos."""

from __future__ import annotations

import pytest

from mcsd.config import GREEDY, ContextConfig, SamplingConfig, SpecConfig
from mcsd.errors import ParamError
from mcsd.tree import TokenTree
from mcsd.verify import RULES, get_rule

SAMPLING = SamplingConfig(temperature=0.8)


# ---------------------------------------------------------------- SamplingConfig
def test_sampling_defaults() -> None:
    config = SamplingConfig()
    assert (config.temperature, config.top_k, config.top_p) == (1.0, 0, 1.0)
    assert not config.greedy
    assert GREEDY.greedy and GREEDY.temperature == 0.0


def test_sampling_numbers_are_normalised_to_float() -> None:
    config = SamplingConfig(temperature=1, top_p=1)
    assert isinstance(config.temperature, float) and isinstance(config.top_p, float)
    assert SamplingConfig(temperature=0).greedy


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, r"temperature must be >= 0 and finite \(0 = greedy\), got -1.0"),
        ({"temperature": float("inf")}, "temperature must be >= 0 and finite"),
        ({"temperature": None}, "temperature must be a number, got None"),
        ({"temperature": True}, "temperature must be a number"),
        ({"top_k": -3}, r"top_k must be an integer >= 0 \(0 disables it\), got -3"),
        ({"top_k": 2.0}, "top_k must be an integer"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\] \(1 disables it\), got 0.0"),
        ({"top_p": 2}, r"top_p must be in \(0, 1\]"),
        ({"top_p": "0.9"}, "top_p must be a number"),
    ],
)
def test_sampling_validation_names_the_parameter(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_sampling_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        SamplingConfig().temperature = 0.5  # type: ignore[misc]


# ---------------------------------------------------------------- rules
def test_check_rule() -> None:
    for rule in RULES:
        assert get_rule(rule).name == rule
    with pytest.raises(ValueError, match="rule must be one of sps, mcss, mcss-wor, topk"):
        get_rule("typical")


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({}, "mcss-wor"),  # the default tree branches
        ({"target": SAMPLING}, "mcss-wor"),
        ({"tree": "1,1,1"}, "sps"),  # a chain: one candidate per node
        ({"tree": [[0], [0, 0]]}, "sps"),
        ({"target": GREEDY}, "greedy"),
        ({"target": GREEDY, "draft": SAMPLING}, "greedy"),
        ({"target": GREEDY, "tree": "1,1"}, "greedy"),
        ({"target": SAMPLING, "draft": GREEDY}, "topk"),  # deterministic candidates
        ({"target": SAMPLING, "draft": GREEDY, "tree": "1,1"}, "topk"),
    ],
)
def test_rule_defaults(kwargs: dict, rule: str) -> None:
    assert SpecConfig(**kwargs).resolved_rule() == rule


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"rule": "mcss"}, "mcss"),
        ({"rule": "mcns"}, "mcns"),
        ({"rule": "topk"}, "topk"),
        ({"rule": "sps", "tree": "1,1,1"}, "sps"),
        ({"rule": "mcss-wor", "tree": "1,1"}, "mcss-wor"),
        ({"rule": "topk", "draft": GREEDY}, "topk"),
        ({"rule": "mcns", "target": GREEDY}, "mcns"),
        ({"rule": "topk", "target": GREEDY}, "topk"),
    ],
)
def test_explicit_rules(kwargs: dict, rule: str) -> None:
    assert SpecConfig(**kwargs).resolved_rule() == rule


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rule": "nope"}, "rule must be one of"),
        ({"rule": "sps"}, r"rule 'sps' verifies one candidate per node, but tree \(4,2,2\)"),
        ({"rule": "sps", "tree": [[0], [1]]}, "rule 'sps' verifies one candidate per node"),
        ({"rule": "mcss", "target": GREEDY}, "rule 'mcss' needs a sampling target"),
        ({"rule": "sps", "tree": "1", "target": GREEDY}, "use rule 'greedy'"),
        ({"rule": "mcss-wor", "draft": GREEDY}, "draft is greedy"),
        ({"rule": "mcss", "draft": GREEDY}, "use rule 'topk'"),
        ({"rule": "sps", "tree": "1,1", "draft": GREEDY}, "needs the draft's sampling"),
    ],
)
def test_invalid_rule_combinations(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpecConfig(**kwargs)


# ---------------------------------------------------------------- SpecConfig fields
def test_spec_defaults() -> None:
    config = SpecConfig()
    assert config.tree == TokenTree.from_config((4, 2, 2))  # the default, built eagerly
    assert config.draft_sampling is config.target
    assert config.max_new_tokens == 128 and config.stop_strings == ()


def test_spec_normalises_fields() -> None:
    config = SpecConfig(tree=(2, 2), stop_strings="\n\n", stop_token_ids=[2, 7])
    assert isinstance(config.tree, TokenTree) and config.tree.num_nodes == 6
    assert config.stop_strings == ("\n\n",)
    assert config.stop_token_ids == (2, 7)
    assert SpecConfig(draft=SAMPLING).draft_sampling is SAMPLING


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": 0.7}, "target must be a SamplingConfig, got float"),
        ({"draft": {"temperature": 0}}, "draft must be a SamplingConfig, got dict"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1, got 0"),
        ({"max_new_tokens": 1.5}, "max_new_tokens must be an integer"),
        ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
        ({"seed": "1"}, "seed must be an integer or None"),
        ({"seed": False}, "seed must be an integer or None"),
        ({"seed": 2**64}, r"seed must be .* in \[-2\*\*63, 2\*\*64 - 1\]"),
        ({"seed": -(2**63) - 1}, r"torch.Generator.manual_seed"),
        ({"stop_strings": ("ok", "")}, "stop_strings must be non-empty strings"),
        ({"stop_token_ids": (1, -1)}, "stop_token_ids must be non-negative integers"),
        ({"tree": "4,0"}, "tree k-config entry k_2"),
        ({"tree": "4,4,4", "max_tree_nodes": 50}, "max_tree_nodes=50"),
        ({"tree": 3.5}, "tree must be a k-config"),
    ],
)
def test_spec_validation_names_the_parameter(kwargs: dict, message: str) -> None:
    with pytest.raises(ParamError, match=message) as caught:
        SpecConfig(**kwargs)
    # the parameter is data too (the server's 400 ``param``), never parsed from the message
    assert caught.value.param == (set(kwargs) - {"max_tree_nodes"}).pop()


@pytest.mark.parametrize(
    ("make", "param"),
    [
        (lambda: SamplingConfig(temperature=-1), "temperature"),
        (lambda: SamplingConfig(top_k=-1), "top_k"),
        (lambda: SamplingConfig(top_p=float("nan")), "top_p"),
        (lambda: SpecConfig(rule="bogus"), "rule"),
        (lambda: SpecConfig(tree="1,1", rule="mcss", target=GREEDY), "rule"),
        (lambda: SpecConfig(tree="dynamic:4:1:1"), "tree"),
        (lambda: SpecConfig(proposer="oracle"), "proposer"),
        (lambda: ContextConfig(max_ngram=0), "max_ngram"),
    ],
)
def test_errors_carry_the_parameter_and_allowed_values(make, param: str) -> None:
    with pytest.raises(ParamError) as caught:
        make()
    assert caught.value.param == param
    assert isinstance(caught.value, ValueError)


def test_seeds_in_torchs_range_are_taken() -> None:
    for seed in (-(2**63), -1, 0, 2**64 - 1):
        assert SpecConfig(seed=seed).seed == seed
    with pytest.raises(ParamError) as caught:
        SpecConfig(seed=2**80)
    assert caught.value.param == "seed"
    assert caught.value.allowed == "an integer in [-2**63, 2**64 - 1], or None"


def test_cli_default_tree_follows_the_runtime(tmp_path, monkeypatch):
    """Without a tuned tree: llama.cpp's own default (a 3-token chain: wide trees cost ~0.6 of a
    target step per node there), DEFAULT_TREE on the transformers runtimes."""
    import argparse

    from mcsd.commands.options import tree_default
    from mcsd.config import DEFAULT_TREE, RUNTIME_DEFAULT_TREES

    monkeypatch.setenv("MCSD_CACHE", str(tmp_path))
    base = dict(target=None, draft=None, device="cpu", dtype="auto", compile="none")
    tree, line = tree_default(argparse.Namespace(runtime="hf", **base))
    assert tree == DEFAULT_TREE and "the default;" in line
    pytest.importorskip("llama_cpp")
    tree, line = tree_default(argparse.Namespace(runtime="llama.cpp", **base))
    assert tree == RUNTIME_DEFAULT_TREES["llama.cpp"] == "1,1,1"
    assert "the default on llama.cpp" in line
