"""The llama.cpp runtime (``mcsd.models.llamacpp``): GGUF models behind the runtime protocol.

Tiny GGUF models written by the test (``mcsd.checks.tiny_gguf``, float32, vocabulary 4) give
exact checks: tree logits against per-path scoring, commits of any branch, the draft's level
forwards, whole-engine losslessness THROUGH llama.cpp (and a tree put in one sequence failing
it), bad input. Real GGUF models (``slow``: SmolLM2-135M, the Qwen2.5-Coder pair) check the same
within the batching tolerance of quantised kernels (batched and one-token decodes round
differently, by up to ~0.5 in the logits), guard against builds that crash on multi-token
batches (the AMX kernels of the default build), check greedy decoding against the verify pass
and against llama.cpp's own greedy loop, and compare the GGUF tokenizer with transformers'.

Without llama-cpp-python the file is skipped, unless ``MCSD_REQUIRE_LLAMACPP=1`` (CI sets it),
where a missing build fails.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

if os.environ.get("MCSD_REQUIRE_LLAMACPP") != "1":
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

from mcsd.api import generate, load_pair
from mcsd.bench.methods import parse_method, run_method
from mcsd.checks.engine import EngineCase, run_engine_case
from mcsd.checks.tiny_gguf import TinyGGUF
from mcsd.config import GREEDY, LlamaCppConfig, SamplingConfig, SpecConfig
from mcsd.draft.base import RowStep
from mcsd.draft.proposer import Drafter
from mcsd.models import factory
from mcsd.models.base import chain_mask, score
from mcsd.models.llamacpp import GGUFTokenizer, LlamaCppModel, load_llamacpp
from mcsd.request import one_request
from mcsd.tree import TokenTree

TINY = LlamaCppConfig(context=64, pending_cells=64, batch=32, sequences=32, threads=1)
# One thread: llama.cpp's threads spin at every barrier, so on a busy (shared CI) machine two of
# them crawl (a 2-second test took 80 s next to two other busy processes); one is steady.
REAL = LlamaCppConfig(context=1024, pending_cells=256, batch=64, sequences=64, threads=1)
EXACT = 1e-3  # float32 tiny models: differently batched decodes agree to rounding
# Quantised real models: batched and one-token decodes of the same text round differently (by
# up to 0.56 for Qwen2.5 0.5B, 1.36 for SmolLM2 over 32 tokens); a tree put in one sequence moves
# the logits of most nodes by 4-14 (the largest node by > 8, measured on both models).
TOLERANCE = 2.0
WRONG = 6.0
TRIALS = 1500  # per losslessness case: ~10 s each through llama.cpp on one thread


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Target, draft (the target's weights, a flatter head: a close, imperfect draft) and a
    model with another vocabulary."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    return {
        "target": TinyGGUF(seed=1).write(root / "target.gguf"),
        "draft": TinyGGUF(seed=1, head_scale=1.3).write(root / "draft.gguf"),
        "other": TinyGGUF(vocab=5, seed=3).write(root / "other.gguf"),
    }


@pytest.fixture(scope="module")
def tiny(tiny_paths: dict[str, Path]) -> tuple[LlamaCppModel, LlamaCppModel]:
    return LlamaCppModel(tiny_paths["target"], TINY), LlamaCppModel(tiny_paths["draft"], TINY)


def _gguf(name: str) -> str:
    from mcsd.sources import resolve_gguf

    return resolve_gguf(name, progress=False)


@pytest.fixture(scope="module")
def smollm2() -> tuple[LlamaCppModel, GGUFTokenizer]:
    runtime, tokenizer, _ = load_llamacpp(_gguf("smollm2-135m-instruct"), REAL)
    return runtime, tokenizer


# ---------------------------------------------------------------------------- helpers
def tree_logits(runtime: LlamaCppModel, prompt: list[int], tree: TokenTree, nodes: list[int]):
    """The engine's verify forward: prefill ``prompt[:-1]``, then [pending, nodes] in one
    forward with the tree mask; logits ``[N + 1, V]``."""
    runtime.reset()
    p = len(prompt) - 1
    runtime.forward(torch.tensor([prompt[:-1]]), torch.arange(p)[None], chain_mask(p))
    runtime.commit()
    n = tree.num_nodes
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[:, 0] = True
    mask[1:, 1:] = tree.ancestor_mask()
    positions = p + torch.tensor([0, *tree.depth])
    return runtime.forward(torch.tensor([[prompt[-1], *nodes]]), positions[None], mask)[0].clone()


def path_tokens(tree: TokenTree, nodes: list[int], u: int) -> list[int]:
    """The tokens from the root's first child down to node ``u`` (empty for the root, -1)."""
    path = []
    while u != -1:
        path.append(nodes[u])
        u = tree.parents[u]
    return path[::-1]


def per_path_logits(runtime: LlamaCppModel, prompt: list[int], tree: TokenTree, nodes: list[int]):
    """Each tree row scored on its own: the prompt and the node's path in one fresh decode."""
    rows = [score(runtime, prompt + path_tokens(tree, nodes, u))[-1] for u in range(-1, len(nodes))]
    return torch.stack(rows)  # [N + 1, V]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().amax(dim=-1)  # per row


# ---------------------------------------------------------------------------- tiny: exact
TREE = TokenTree.parse((3, 2, 2))  # 3 + 6 + 12 = 21 nodes, 12 leaves


def test_tree_in_one_decode_equals_per_path_decodes(tiny) -> None:
    target, _ = tiny
    nodes = [(3 * u + 1) % 4 for u in range(TREE.num_nodes)]
    diff = max_diff(
        tree_logits(target, [1, 2, 0], TREE, nodes), per_path_logits(target, [1, 2, 0], TREE, nodes)
    )
    assert diff.max() < EXACT, diff


@pytest.mark.usefixtures("wrong_sequences")
def test_tree_in_one_sequence_is_caught(tiny) -> None:
    target, _ = tiny
    nodes = [(3 * u + 1) % 4 for u in range(TREE.num_nodes)]
    wrong = tree_logits(target, [1, 2, 0], TREE, nodes)
    diff = max_diff(wrong, per_path_logits(target, [1, 2, 0], TREE, nodes))
    assert diff.max() > 100 * EXACT, diff


@pytest.mark.parametrize("keep", [[], [0], [2], [0, 3], [2, 8], [1, 5, 13]])
def test_commit_keeps_exactly_the_kept_path(tiny, keep: list[int]) -> None:
    """Commit root + a path of any branch (the later ones leave freed cells before the kept
    ones), then the next token's logits equal a fresh decode of the committed text."""
    target, _ = tiny
    prompt = [1, 2, 0]
    nodes = [(u * 7 + 2) % 4 for u in range(TREE.num_nodes)]
    tree_logits(target, prompt, TREE, nodes)
    target.commit([[0, *(1 + u for u in keep)]])
    committed = prompt + [nodes[u] for u in keep]
    assert target.cache_lengths() == (len(committed),)
    for token in (3, 1):  # two more steps through the runtime
        step = target.forward(
            torch.tensor([[token]]), torch.tensor([[len(committed)]]), chain_mask(1)
        )
        target.commit()
        committed.append(token)
        fresh = score(target_copy(target), committed)[-1]
        assert max_diff(step[0, -1], fresh) < EXACT


def target_copy(runtime: LlamaCppModel) -> LlamaCppModel:
    """A second context on the same GGUF (the reference decode must not disturb ``runtime``)."""
    return LlamaCppModel(runtime.path, runtime.config)


@pytest.mark.parametrize("batch", [32, 5])  # one decode, or the forward split over decodes
def test_logits_last_and_none(tiny_paths, batch: int) -> None:
    """A prefill may skip the head (``logits="none"``) or keep the last row (``"last"``): the
    same state and the same last row as ``"all"``, also when split over several decodes."""
    from dataclasses import replace

    runtime = LlamaCppModel(tiny_paths["target"], replace(TINY, batch=batch, sequences=4))
    ids = [1, 2, 0, 3, 2, 1, 0, 1, 2, 3, 3, 0]
    n = len(ids)
    every = score(runtime, ids)  # [n, V]
    for rows in ("last", "none"):
        runtime.reset()
        out = runtime.forward(
            torch.tensor([ids]), torch.arange(n)[None], chain_mask(n), logits=rows
        )
        runtime.commit()
        if rows == "last":
            assert out.shape == (1, 1, 4) and max_diff(out[0, 0], every[-1]) < EXACT
        else:
            assert out is None
        step = runtime.forward(torch.tensor([[1]]), torch.tensor([[n]]), chain_mask(1))[0, 0]
        assert max_diff(step, score(target_copy(runtime), [*ids, 1])[-1]) < EXACT
    runtime.reset()
    with pytest.raises(ValueError, match="logits must be one of"):
        runtime.forward(torch.tensor([[1]]), torch.tensor([[0]]), chain_mask(1), logits="first")


def test_draft_levels_match_per_path_scoring(tiny) -> None:
    """The draft role: one forward per tree level, each attending to earlier forwards; every
    node's q equals the draft's distribution after the node's own path, scored on its own."""
    _, draft = tiny
    spec = SpecConfig(
        tree="3,2,2", rule="mcss", target=SamplingConfig(temperature=1.0), max_new_tokens=4
    )
    proposer = Drafter(draft, vocab_size=4)
    prompt = [1, 2, 0, 3]
    request = one_request(spec, prompt, torch.Generator().manual_seed(0))
    proposer.start(request)
    (proposal,) = proposer.propose([request], [None])
    nodes = proposal.tokens.tolist()
    tree = proposal.tree
    reference = LlamaCppModel(draft.path, draft.config)
    for u in range(-1, tree.num_nodes):
        if u >= 0 and not tree.children(u):
            continue  # leaves are not run through the draft
        expected = torch.softmax(score(reference, prompt + path_tokens(tree, nodes, u))[-1], -1)
        assert (proposal.q[u + 1] - expected).abs().max() < EXACT, u


def test_draft_commit_then_next_step(tiny) -> None:
    """Commit a path through later branches that the draft ran (level forwards), then the next
    proposal's first level equals the draft's top tokens after the committed text."""
    _, draft = tiny
    spec = SpecConfig(tree="2,2,1", target=GREEDY, max_new_tokens=4)
    proposer = Drafter(draft, vocab_size=4)
    prompt = [1, 2, 0]
    request = one_request(spec, prompt, torch.Generator())
    proposer.start(request)
    (proposal,) = proposer.propose([request], [None])
    second = proposal.tree.children(1)[1]  # the second child of the second root child
    path = [int(proposal.tokens[u]) for u in (1, second)]
    proposer.commit([request], [RowStep(accepted=[1, second], tokens=[*path, 3])])
    committed = [*prompt, *path, 3]
    request.committed = committed
    (after,) = proposer.propose([request], [None])
    fresh = score(LlamaCppModel(draft.path, draft.config), committed)[-1]
    assert after.tokens[:2].tolist() == torch.topk(fresh, 2).indices.tolist()


# ---------------------------------------------------------------------------- losslessness
RUNTIME_CASES = [
    EngineCase("sps", "1,1,1"),
    EngineCase("mcss-wor", "4,2,2"),
    EngineCase("mcss", "2,2"),
    EngineCase("topk", "paths"),
    EngineCase("greedy", "4,2,2"),
]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("case", RUNTIME_CASES, ids=lambda c: c.describe().replace(" ", "-"))
def test_engine_through_llamacpp_is_lossless(tiny, case: EngineCase) -> None:
    result = run_engine_case(case, TRIALS, seed=1, models=tiny)
    assert result.fit.passed, (case.describe(), result.fit)
    assert result.mean_accepted_length > 1.2  # the draft is close: deep paths get committed


@pytest.mark.usefixtures("one_torch_thread")
def test_engine_with_a_tree_in_one_sequence_is_caught(tiny, monkeypatch) -> None:
    """The target's verify forward with every node in one sequence (siblings see each other;
    the commit then keeps the siblings too): the same test must reject it. (A wrong draft could
    not fail it: a draft only proposes.)"""
    from conftest import one_sequence

    target, _ = tiny
    plan = target._rows[0].plan
    monkeypatch.setattr(target._rows[0], "plan", lambda *a: one_sequence(plan(*a)))
    result = run_engine_case(EngineCase("mcss-wor", "4,2,2"), TRIALS, seed=1, models=tiny)
    assert not result.fit.passed, result.fit


# ---------------------------------------------------------------------------- bad input
def test_bad_input_is_one_clear_line(tiny, tiny_paths, tmp_path: Path) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, not a GGUF")
    errors = []
    with pytest.raises(ValueError, match="is not a GGUF file") as error:
        LlamaCppModel(not_gguf, TINY)
    errors.append(error)
    with pytest.raises(ValueError, match="does not exist") as error:
        LlamaCppModel(tmp_path / "missing.gguf", TINY)
    errors.append(error)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_paths["target"].read_bytes()[:4096])
    with pytest.raises(ValueError, match="could not load") as error:
        LlamaCppModel(truncated, TINY)
    errors.append(error)
    with pytest.raises(ValueError, match="different tokenizers") as error:
        load_pair(
            str(tiny_paths["target"]), str(tiny_paths["other"]), runtime="llama.cpp", llamacpp=TINY
        )
    errors.append(error)
    target, _ = tiny
    target.reset()
    cells = TINY.context + TINY.pending_cells
    with pytest.raises(ValueError, match="context overflow") as error:
        target.forward(
            torch.zeros(1, cells + 1, dtype=torch.long),
            torch.arange(cells + 1)[None],
            chain_mask(cells + 1),
        )
    errors.append(error)
    pair = load_pair(
        str(tiny_paths["target"]), str(tiny_paths["draft"]), runtime="llama.cpp", llamacpp=TINY
    )
    with pytest.raises(ValueError, match="model context of 64") as error:
        generate(pair, [1] * 70, SpecConfig(tree="2", target=GREEDY, max_new_tokens=4))
    errors.append(error)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1") as error:
        LlamaCppModel(tiny_paths["target"], TINY, batch_size=0)
    errors.append(error)
    with pytest.raises(ValueError, match="dtype") as error:
        load_pair(
            str(tiny_paths["target"]),
            str(tiny_paths["draft"]),
            runtime="llama.cpp",
            dtype="float32",
        )
    errors.append(error)
    assert all("\n" not in str(e.value) for e in errors), [str(e.value) for e in errors]


def test_masks_and_positions_llamacpp_cannot_run_are_refused(tiny) -> None:
    target, _ = tiny
    target.reset()
    skips_the_grandparent = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match="not one entry and all of its ancestors"):
        target.forward(torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]]), skips_the_grandparent)
    with pytest.raises(ValueError, match="its position must be 1"):
        target.forward(torch.tensor([[1, 2]]), torch.tensor([[0, 2]]), chain_mask(2))
    assert target.pending_length == 0  # a refused forward changes nothing


# ---------------------------------------------------------------------------- selection
def test_runtime_selection_and_the_auto_log_line(
    tiny_paths, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu = torch.device("cpu")
    target = str(tiny_paths["target"])
    assert factory.runtime_kind("auto", cpu, target).name == "llama.cpp"
    assert factory.runtime_kind("auto", cpu, "qwen2.5-coder-1.5b-instruct").name == "llama.cpp"
    assert factory.runtime_kind("auto", cpu, "org/some-hf-model").name == "hf"
    assert factory.runtime_kind("auto", torch.device("cuda"), target).name == "hf"
    with caplog.at_level(logging.INFO, logger="mcsd"):
        pair = load_pair(target, str(tiny_paths["draft"]), device="cpu", llamacpp=TINY)
    lines = [r.getMessage() for r in caplog.records if "runtime auto" in r.getMessage()]
    assert len(lines) == 1 and "llama.cpp" in lines[0], lines
    assert isinstance(pair.target, LlamaCppModel) and isinstance(pair.draft, LlamaCppModel)
    assert pair.target.name == "llama.cpp:target" and pair.vocab_size == 4
    from mcsd.models import llamacpp

    monkeypatch.setattr(llamacpp, "bindings_available", lambda: False)
    assert factory.runtime_kind("auto", cpu, target).name == "hf"


def test_cli_runtime_choice_lists_llamacpp() -> None:
    from mcsd.commands.options import RUNTIME_CHOICES

    assert RUNTIME_CHOICES[0] == "auto" and "llama.cpp" in RUNTIME_CHOICES


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"context": 1}, "context must be an integer >= 2"),
        ({"sequences": 300}, "sequences must be an integer <= 256"),
        ({"batch": 16, "sequences": 32}, r"batch \(16\) must be >= sequences \(32\)"),
        ({"threads": 0}, "threads must be an integer >= 1"),
        ({"repack": "yes"}, "repack must be True or False"),
    ],
)
def test_config_names_the_parameter(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LlamaCppConfig(**options)


def test_tiny_tokenizer(tiny) -> None:
    tokenizer = tiny[0].tokenizer()
    assert tokenizer("abca")["input_ids"] == [0, 1, 2, 0]
    assert tokenizer.decode([3, 2, 1]) == "dcb"
    assert len(tokenizer) == 4 and tokenizer.eos_token_id == 3
    assert tokenizer.get_vocab() == {"a": 0, "b": 1, "c": 2, "d": 3}
    with pytest.raises(ValueError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}])


# ---------------------------------------------------------------------------- baselines
def test_llamacpp_baselines_run_and_agree_with_mcsd_greedy(tiny_paths) -> None:
    pair = load_pair(
        str(tiny_paths["target"]), str(tiny_paths["draft"]), runtime="llama.cpp", llamacpp=TINY
    )
    base = SpecConfig(tree="1", target=GREEDY, max_new_tokens=12, stop_token_ids=(), seed=0)
    prompt = [1, 2, 0]
    answers = {
        name: run_method(parse_method(name), pair, prompt, base).tokens
        for name in ("llama-ar", "llama-spec", "llama-spec:5:0.3", "ar", "tree:2,2")
    }
    assert len(set(map(tuple, answers.values()))) == 1, answers
    assert len(answers["llama-ar"]) == 12
    sampled = SpecConfig(tree="1", target=SamplingConfig(temperature=1.0), max_new_tokens=8, seed=3)
    for name in ("llama-ar", "llama-spec:4"):
        first = run_method(parse_method(name), pair, prompt, sampled)
        again = run_method(parse_method(name), pair, prompt, sampled)
        assert first.tokens == again.tokens and all(0 <= t < 4 for t in first.tokens)
    with pytest.raises(ValueError, match="llama-spec:N"):
        parse_method("llama-spec:0")


def test_server_on_llamacpp(tiny_paths) -> None:
    """The OpenAI-compatible server on a llama.cpp pair: the GGUF tokenizer in the worker."""
    from fastapi.testclient import TestClient

    from mcsd.server.app import create_app

    pair = load_pair(
        str(tiny_paths["target"]), str(tiny_paths["draft"]), runtime="llama.cpp", llamacpp=TINY
    )
    app = create_app(pair, SpecConfig(tree="2,2", target=GREEDY, max_new_tokens=6))
    with TestClient(app) as client:
        response = client.post("/v1/completions", json={"prompt": "abca", "max_tokens": 6})
        assert response.status_code == 200, response.text
        text = response.json()["choices"][0]["text"]
    assert 1 <= len(text) <= 6 and set(text) <= set("abcd")


def test_llamacpp_baselines_refuse_other_runtimes(tiny) -> None:
    from mcsd.models.llamacpp_baselines import llamacpp_model
    from mcsd.models.toy import TableLM

    with pytest.raises(ValueError, match=r"needs the llama\.cpp runtime"):
        llamacpp_model(TableLM.random(4), "llama-ar")


# ---------------------------------------------------------------------------- real models
@pytest.mark.slow
def test_multi_token_batch_decodes(smollm2) -> None:
    """Guards builds whose kernels crash on batches of more than one token (AMX): a 32-token
    decode must run and agree with one-token decodes."""
    runtime, tokenizer = smollm2
    ids = tokenizer("def fibonacci(n):\n    if n < 2:\n        return n\n    return fib")[
        "input_ids"
    ]
    ids = (ids * 4)[:32]
    batched = score(runtime, ids)
    assert torch.isfinite(batched).all()
    runtime.reset()
    single = []
    for position, token in enumerate(ids):
        single.append(
            runtime.forward(torch.tensor([[token]]), torch.tensor([[position]]), chain_mask(1))[
                0, 0
            ]
        )
        runtime.commit()
    assert max_diff(torch.stack(single), batched).max() < TOLERANCE


@pytest.mark.xdist_group("qwen-pair")  # the worker of tests/test_real_pair.py: one conversion
@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_real_tree_logits_and_the_wrong_mask_control(
    model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import one_sequence

    from mcsd.models.sequences import SequenceMap

    runtime, tokenizer, _ = load_llamacpp(_gguf(model), REAL)
    prompt = tokenizer("def fibonacci(n):\n    if n")["input_ids"]
    nodes = torch.randint(
        100, 2000, (TREE.num_nodes,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    reference = per_path_logits(runtime, prompt, TREE, nodes)
    good = max_diff(tree_logits(runtime, prompt, TREE, nodes), reference)
    assert good.max() < TOLERANCE, good
    original = SequenceMap.plan
    monkeypatch.setattr(SequenceMap, "plan", lambda self, *a: one_sequence(original(self, *a)))
    wrong = max_diff(tree_logits(runtime, prompt, TREE, nodes), reference)
    assert wrong.max() > WRONG, wrong
    monkeypatch.undo()
    runtime.reset()
    tree_logits(runtime, prompt, TREE, nodes)
    runtime.commit([[0, 2, 1 + TREE.children(1)[1]]])  # a later branch
    committed = [*prompt, nodes[1], nodes[TREE.children(1)[1]]]
    step = runtime.forward(torch.tensor([[13]]), torch.tensor([[len(committed)]]), chain_mask(1))[
        0, 0
    ]
    fresh = score(target_copy(runtime), [*committed, 13])[-1]
    assert max_diff(step, fresh) < TOLERANCE


class _Recorder:
    """Wraps a runtime: keeps every forward's tokens and logits (the verify passes)."""

    def __init__(self, inner: LlamaCppModel) -> None:
        self.inner = inner
        self.calls: list[tuple[list[int], torch.Tensor]] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def forward(self, tokens, positions, tree_mask, *, logits="all"):
        out = self.inner.forward(tokens, positions, tree_mask, logits=logits)
        if logits == "all":
            self.calls.append((tokens[0].tolist(), out[0].clone()))
        return out


GREEDY_PROMPTS = ["def quicksort(arr):", "The capital of France is"]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", GREEDY_PROMPTS)
def test_greedy_emits_the_verify_argmax_and_matches_llamacpp_greedy(prompt: str, capsys) -> None:
    """SmolLM2 as its own draft, tree 2,2: every emitted token is the target's argmax at its
    position in the verify pass that emitted it; the output equals llama.cpp's own greedy loop
    (prompts chosen without near-ties; the agreement is printed)."""
    from mcsd.engine import speculative_decode
    from mcsd.models.llamacpp_baselines import autoregressive

    path = _gguf("smollm2-135m-instruct")
    target, tokenizer, eos = load_llamacpp(path, REAL)
    draft = LlamaCppModel(path, REAL)
    recorder = _Recorder(target)
    spec = SpecConfig(
        tree="2,2", target=GREEDY, draft=SamplingConfig(temperature=0.0), max_new_tokens=40
    )
    ids = tokenizer(prompt)["input_ids"]
    proposer = Drafter(draft, vocab_size=len(tokenizer))
    steps = list(
        speculative_decode(
            recorder, proposer, ids, spec, vocab_size=len(tokenizer), stop_token_ids=frozenset(eos)
        )
    )
    verifies = [call for call in recorder.calls if len(call[0]) == spec.token_tree().num_nodes + 1]
    assert len(verifies) == len(steps)
    tree = spec.token_tree()
    emitted = []
    for step, (tokens, logits) in zip(steps, verifies, strict=True):
        row = 0  # walk the tree along the argmaxes: each emitted token must be the row's argmax
        for token in step.tokens:
            assert token == int(logits[row, : len(tokenizer)].argmax())
            children = tree.children(row - 1) if row else tree.children(-1)
            row = next((1 + c for c in children if tokens[1 + c] == token), None)
            if row is None:
                break
        emitted += step.tokens
    reference, _, _ = autoregressive(
        target, ids, GREEDY, frozenset(eos), 40, vocab_size=len(tokenizer)
    )
    same = next(
        (i for i, (a, b) in enumerate(zip(emitted, reference, strict=False)) if a != b),
        min(len(emitted), len(reference)),
    )
    with capsys.disabled():
        print(
            f"\n  greedy agreement with llama.cpp on {prompt!r}: "
            f"first {same} of {len(reference)} tokens"
        )
    assert emitted == reference


QWEN = ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct")
TEXTS = [
    "def quicksort(arr):\n    return sorted(arr)  # \u00e9t\u00e9 \u4e2d\u6587 \U0001f600",
    "   leading spaces, <|im_start|> special tokens <|endoftext|> in text\n\n\t tabs",
    "",
]
MESSAGES = [
    [{"role": "user", "content": "Write a haiku about KV caches."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
]


@pytest.mark.xdist_group("qwen-pair")  # the worker of tests/test_real_pair.py: one conversion
@pytest.mark.slow
@pytest.mark.parametrize("name", QWEN)
def test_gguf_tokenizer_matches_transformers(name: str) -> None:
    from transformers import AutoTokenizer

    from mcsd.sources import resolve

    ours = GGUFTokenizer.from_file(_gguf(name))
    theirs = AutoTokenizer.from_pretrained(resolve(name, progress=False))
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids == theirs(text, add_special_tokens=True)["input_ids"], text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            )
    for messages in MESSAGES:
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(expected, dict) or hasattr(expected, "input_ids"):
            expected = expected["input_ids"]
        assert ours.apply_chat_template(messages, add_generation_prompt=True) == list(expected)
    # transformers' tokenizer converted from the GGUF also counts the 271 padding rows
    # ([PAD151665] ...); ours stops at the last token in use, the real tokenizer's 151,665
    assert len(ours) == 151_665 and len(theirs) in (151_665, 151_936)
    assert ours.get_vocab() == theirs.get_vocab()
    assert ours.eos_token_id == theirs.eos_token_id


@pytest.mark.xdist_group("qwen-pair")  # the worker of tests/test_real_pair.py: one conversion
@pytest.mark.slow
def test_default_pair_runs_on_llamacpp_without_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default pair on auto (CPU): llama.cpp, GGUFs kept in the cache, no conversion."""
    import importlib

    fetch = importlib.import_module("mcsd.sources.fetch")  # the module, not the function

    def no_conversion(*args, **kwargs):
        raise AssertionError("the llama.cpp runtime must not convert")

    monkeypatch.setattr(fetch, "convert_gguf", no_conversion)
    pair = load_pair(device="cpu", progress=False, llamacpp=REAL)
    assert pair.target.name.startswith("llama.cpp:qwen2.5-coder-1.5b")
    assert pair.eos_token_ids == (151645, 151643)  # <|im_end|>, <|endoftext|>, as on hf
    result = generate(
        pair, "def add(a, b):", SpecConfig(tree="2,2", target=GREEDY, max_new_tokens=8)
    )
    assert len(result.token_ids) == 8 and result.text.strip()


def test_context_only_on_llamacpp_loads_no_draft(tiny_paths, tmp_path: Path) -> None:
    """``proposer="context"`` on llama.cpp: no draft model (its path does not exist), greedy
    output equal to the target's own, and a sampled run through the same engine is lossless."""
    pair = load_pair(
        str(tiny_paths["target"]),
        str(tmp_path / "missing.gguf"),
        runtime="llama.cpp",
        llamacpp=TINY,
        load_draft=False,
    )
    assert pair.draft is None
    base = SpecConfig(tree="1", target=GREEDY, max_new_tokens=16, stop_token_ids=(), seed=0)
    prompt = [1, 2, 0, 3, 1, 2, 0, 3, 1, 2]
    answers = {
        name: run_method(parse_method(name), pair, prompt, base).tokens
        for name in ("llama-ar", "ar", "ctx", "ctx:3")
    }
    assert len(set(map(tuple, answers.values()))) == 1, answers
    case = EngineCase("topk", "2,2", prompt=(1, 2, 0, 1, 2), proposer="context")
    result = run_engine_case(case, TRIALS, seed=1, models=(pair.target, pair.target))
    assert result.fit.passed, result.fit
