"""Rows on the llama.cpp runtime (``LlamaCppModel(batch_size=B)``, ``with_rows``): B sequences
in one llama.cpp context, each row its own block of sequence ids, all rows' tokens in one
``llama_batch``.

On the tiny GGUF models (``mcsd.checks.tiny_gguf``, float32, vocabulary 4), exactly:

- a forward of every row (prompts of different lengths, a token tree) gives each row the logits
  it gets alone in a context of its own, also after commits of different paths per row, after
  one row is reset and refilled, and through ``forward_rows`` (a subset of the rows, the others
  untouched and unable to keep or see its padding); every row's tree is one ``llama_decode``;
  a commit that used ``seq_keep`` (which drops the other rows' ids) is caught by the same check;
- the draft over rows whose uncached tokens differ in length (left padding) proposes what each
  row proposes alone;
- the batch engine at 3 rows, greedy and seeded sampling, gives every prompt its batch-1 output
  (``mcsd.generate`` over a list of prompts included, and with the adaptive tree budget);
- whole-engine losslessness at batch 4 through llama.cpp, and a broken engine (each row verified
  with its neighbour's logits) failing the same test;
- the server at 4 rows and ``mcsd bench --runtime llama.cpp --batch-size 4``;
- bad input: ``batch_size < 1``, more sequence ids than llama.cpp allows or ``batch`` covers.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

if os.environ.get("MCSD_REQUIRE_LLAMACPP") != "1":
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

from mcsd.api import generate, load_pair
from mcsd.checks.engine import EngineCase, batch_generations, run_batch_engine_case
from mcsd.checks.tiny_gguf import TinyGGUF
from mcsd.config import GREEDY, LlamaCppConfig, SamplingConfig, SpecConfig
from mcsd.engine import Engine
from mcsd.models.base import chain_mask, rows_forward, score, with_rows
from mcsd.models.llamacpp import LlamaCppModel
from mcsd.tree import TokenTree

# Up to 4 rows x 32 sequence ids (row_sequences None: as many as 256 ids and ``batch`` allow,
# at most ``sequences``); one thread (see tests/test_llamacpp.py: llama.cpp's threads spin at
# barriers and crawl on a busy machine)
ROWS = LlamaCppConfig(context=64, pending_cells=64, batch=128, sequences=32, threads=1)
# 3 rows x 13 ids: a tree of 12 leaves per row; 3 x 22 tokens then span two decodes of 40
SPLIT = replace(ROWS, batch=40, row_sequences=13)
EXACT = 1e-3  # float32 tiny models: differently batched decodes agree to rounding
TREE = TokenTree.parse((3, 2, 2))  # 21 nodes, 12 leaves: 3 rows x 22 tokens span two decodes
PROMPTS = ([1, 2, 0], [3], [0, 1, 2, 3, 1])  # ragged
TRIALS = 400  # per prompt of the batch losslessness case: 1,600 generations


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-gguf-rows")
    return {
        "target": TinyGGUF(seed=1).write(root / "target.gguf"),
        "draft": TinyGGUF(seed=1, head_scale=1.3).write(root / "draft.gguf"),
    }


@pytest.fixture(scope="module")
def single(tiny_paths) -> LlamaCppModel:
    """One row: the reference every row must match."""
    return LlamaCppModel(tiny_paths["target"], ROWS)


@pytest.fixture
def rows(single: LlamaCppModel) -> LlamaCppModel:
    """Three rows on the reference's loaded weights (a new context each test)."""
    return LlamaCppModel(single.path, SPLIT, batch_size=3, weights=single.model)


# ---------------------------------------------------------------------------- helpers
def prefill(runtime: LlamaCppModel, row: int, prompt: list[int]) -> None:
    """Read ``prompt[:-1]`` into ``row`` alone (as the engine's prefill does)."""
    p = len(prompt) - 1
    if p:
        tokens = torch.tensor([prompt[:-1]])  # [1, p]
        rows_forward(runtime, [row], tokens, torch.arange(p)[None], chain_mask(p), logits="none")
    keep = [list(range(p)) if r == row else [] for r in range(runtime.batch_size)]
    runtime.commit(keep)


def tree_block(
    prompts: list[list[int]], nodes: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The engine's verify forward: per row [pending, nodes], positions after each row's
    committed prompt, the tree mask; ``([B, N+1], [B, N+1], [N+1, N+1])``."""
    n = TREE.num_nodes
    mask = torch.zeros(n + 1, n + 1, dtype=torch.bool)
    mask[:, 0] = True
    mask[1:, 1:] = TREE.ancestor_mask()
    tokens = torch.tensor([[p[-1], *row] for p, row in zip(prompts, nodes, strict=True)])
    offsets = torch.tensor([0, *TREE.depth])
    positions = torch.stack([len(p) - 1 + offsets for p in prompts])
    return tokens, positions, mask


def alone(single: LlamaCppModel, prompt: list[int], nodes: list[int]) -> torch.Tensor:
    """The tree logits of one prompt in a context of its own, ``[N+1, V]``."""
    single.reset()
    prefill(single, 0, prompt)
    tokens, positions, mask = tree_block([prompt], [nodes])
    logits = single.forward(tokens, positions, mask)[0].clone()
    single.reset()
    return logits


def node_tokens(seed: int) -> list[int]:
    return [(seed * 5 + 3 * u + 1) % 4 for u in range(TREE.num_nodes)]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ---------------------------------------------------------------------------- the runtime
def test_rows_forward_equals_each_row_alone(single, rows) -> None:
    """Ragged prompts, then one forward of every row's tree (two llama_decodes): each row's
    logits are its own; commits of different paths per row, then a chain step of every row:
    each row's logits equal a fresh decode of its committed text."""
    prompts = [list(p) for p in PROMPTS]
    nodes = [node_tokens(seed) for seed in range(3)]
    expected = [alone(single, p, n) for p, n in zip(prompts, nodes, strict=True)]
    for row, prompt in enumerate(prompts):
        prefill(rows, row, prompt)
    assert rows.cache_lengths() == (2, 0, 4)
    logits = rows.forward(*tree_block(prompts, nodes))  # [3, N+1, V]
    for row in range(3):
        assert max_diff(logits[row], expected[row]) < EXACT, row
    paths = [[], [2, 8], [1, 5, 13]]  # root only, a later branch, the deepest of another
    rows.commit([[0, *(1 + u for u in path)] for path in paths])
    committed = [p + [n[u] for u in path] for p, n, path in zip(prompts, nodes, paths, strict=True)]
    assert rows.cache_lengths() == tuple(len(c) for c in committed)
    for token in (3, 1):
        tokens = torch.tensor([[token]] * 3)  # [3, 1]
        positions = torch.tensor([[len(c)] for c in committed])  # [3, 1]
        step = rows.forward(tokens, positions, chain_mask(1), logits="last")  # [3, 1, V]
        rows.commit()
        for row, text in enumerate(committed):
            text.append(token)
            assert max_diff(step[row, 0], score(single, text)[-1]) < EXACT, (row, token)


class KeepOneRow:
    """Broken llama.cpp bindings: a row's commit drops its branch ids with ``seq_keep`` of its
    committed id, which drops every other row's ids too."""

    def __init__(self, lib, per_row: int) -> None:
        self._lib, self._per_row = lib, per_row

    def __getattr__(self, name: str):
        return getattr(self._lib, name)

    def llama_memory_seq_rm(self, memory, seq: int, start: int, end: int) -> bool:
        return self._lib.llama_memory_seq_keep(memory, seq - seq % self._per_row)


def test_seq_keep_in_a_row_commit_is_caught(single, rows) -> None:
    """Prefills of three rows, then a step of every row, with the broken commit: the rows
    committed before the last lost their cells, so their logits are wrong."""
    prompts = [[1, 2, 0], [3, 1], [0, 1, 2, 3, 1]]
    rows._lib = KeepOneRow(rows._lib, SPLIT.row_sequences)
    for row, prompt in enumerate(prompts):
        prefill(rows, row, prompt)
    tokens = torch.tensor([[p[-1]] for p in prompts])  # [3, 1]
    positions = torch.tensor([[len(p) - 1] for p in prompts])  # [3, 1]
    step = rows.forward(tokens, positions, chain_mask(1))
    diffs = [max_diff(step[row, 0], score(single, p)[-1]) for row, p in enumerate(prompts)]
    assert min(diffs[:2]) > 100 * EXACT and diffs[2] < EXACT, diffs


def test_reset_of_one_row_leaves_the_others(single, rows) -> None:
    prompts = [list(p) for p in PROMPTS]
    for row, prompt in enumerate(prompts):
        prefill(rows, row, prompt)
    rows.reset(1)
    assert rows.cache_lengths() == (2, 0, 4)  # row 1 held nothing of its one-token prompt
    prompts[1] = [2, 2, 1, 0]
    rows.reset(1)
    prefill(rows, 1, prompts[1])
    rows.reset(0)
    prompts[0] = [0, 3]
    prefill(rows, 0, prompts[0])
    assert rows.cache_lengths() == (1, 3, 4)
    tokens = torch.tensor([[p[-1]] for p in prompts])
    positions = torch.tensor([[len(p) - 1] for p in prompts])
    step = rows.forward(tokens, positions, chain_mask(1))
    for row, prompt in enumerate(prompts):
        assert max_diff(step[row, 0], score(single, prompt)[-1]) < EXACT, row
    rows.commit([[], [0], []])
    with pytest.raises(ValueError, match="row must be in"):
        rows.reset(3)
    positions = torch.tensor(rows.cache_lengths())[:, None]  # [3, 1]
    rows.forward(tokens, positions, chain_mask(1), logits="none")
    with pytest.raises(ValueError, match="empty pending block"):
        rows.reset(0)


def test_forward_rows_runs_the_rows_given(single, rows) -> None:
    """A subset forward: the other rows get padding entries (zero logits), which a later token
    may not see and a commit may not keep; the rows run equal their own decode."""
    prompts = [list(p) for p in PROMPTS]
    for row, prompt in enumerate(prompts):
        prefill(rows, row, prompt)
    tokens = torch.tensor([[prompts[0][-1], 3], [prompts[2][-1], 0]])  # [2, 2]
    positions = torch.tensor([[2, 3], [4, 5]])
    out = rows.forward_rows([0, 2], tokens, positions, chain_mask(2), logits="last")
    assert out.shape == (3, 1, 4) and not out[1].any()
    assert max_diff(out[0, 0], score(single, [*prompts[0], 3])[-1]) < EXACT
    assert max_diff(out[2, 0], score(single, [*prompts[2], 0])[-1]) < EXACT
    assert rows.pending_length == 2
    with pytest.raises(ValueError, match="padding of a forward that ran other rows only"):
        rows.forward_rows([1], torch.tensor([[1]]), torch.tensor([[1]]), torch.ones(1, 3).bool())
    with pytest.raises(ValueError, match="keep: entry 0 is padding"):
        rows.commit([[0, 1], [0], [0]])
    assert rows.cache_lengths() == (2, 0, 4)  # a refused commit changes nothing
    rows.commit([[0, 1], [], [0]])
    assert rows.cache_lengths() == (4, 0, 5)
    with pytest.raises(ValueError, match=r"rows must be 2 increasing row indices in \[0, 3\)"):
        rows.forward_rows([2, 0], tokens, positions + 2, chain_mask(2))
    with pytest.raises(ValueError, match="rows must be 1 increasing"):
        rows.forward_rows([3], tokens[:1], positions[:1], chain_mask(2))


def test_a_forward_of_every_row_is_one_decode(single) -> None:
    """Three rows' trees (3 x 22 tokens) in one llama_decode when ``batch`` holds them."""
    rows = single.with_rows(3)
    calls = []
    decode = rows._decode
    rows._decode = lambda m: (calls.append(m), decode(m))[1]  # type: ignore[method-assign]
    prompts = [[1], [2], [3]]
    rows.forward(*tree_block(prompts, [node_tokens(seed) for seed in range(3)]))
    assert calls == [3 * (TREE.num_nodes + 1)]


def test_draft_rows_with_uncached_tokens_of_different_lengths(tiny_paths, single) -> None:
    """The draft over 2 rows, one with 6 uncached tokens and one with 1 (left-padded: the
    padding tokens are roots with ids of their own): each row's proposal and q equal its
    proposal alone."""
    from mcsd.draft.proposer import Drafter
    from mcsd.request import one_request

    draft = LlamaCppModel(tiny_paths["draft"], ROWS)
    spec = SpecConfig(
        tree="2,2", rule="mcss", target=SamplingConfig(temperature=1.0), max_new_tokens=4
    )
    committed = [[1, 2, 0, 3, 1, 2, 0, 1], [2]]
    together = Drafter(draft.with_rows(2), vocab_size=4)
    requests = [
        one_request(spec, committed[0][:3], torch.Generator().manual_seed(1), row=0),
        one_request(spec, committed[1], torch.Generator().manual_seed(2), row=1),
    ]
    for request in requests:
        together.start(request)
    together.extend(requests[0], committed[0][3:])
    requests[0].committed = list(committed[0])
    proposals = together.propose(requests, [None, None])
    for row, proposal in enumerate(proposals):
        alone = Drafter(draft, vocab_size=4)
        request = one_request(spec, committed[row], torch.Generator().manual_seed(row + 1))
        alone.start(request)
        (expected,) = alone.propose([request], [None])
        assert proposal.tokens.tolist() == expected.tokens.tolist(), row
        assert max_diff(proposal.q, expected.q) < EXACT, row


def test_bad_input_names_the_parameter(tiny_paths, single) -> None:
    path = tiny_paths["target"]
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        LlamaCppModel(path, ROWS, batch_size=0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        with_rows(single, 0)
    fixed = LlamaCppModel(path, replace(ROWS, row_sequences=16), weights=single.model)
    with pytest.raises(
        ValueError, match=r"17 rows x LlamaCppConfig\.row_sequences=16 = 272 sequence ids"
    ):
        fixed.with_rows(17)
    with pytest.raises(ValueError, match=r"LlamaCppConfig\.batch \(128\) must be >= batch_size"):
        fixed.with_rows(9)  # 9 x 16 = 144 ids, llama.cpp keeps a logits row for each
    with pytest.raises(ValueError, match="129 rows leave 0 sequence ids per row"):
        single.with_rows(129)
    assert single.with_rows(4)._rows[3].base == 3 * 32  # 4 rows x 32 (ROWS.sequences)
    with pytest.raises(ValueError, match="row_sequences must be an integer >= 2"):
        replace(ROWS, row_sequences=1)
    narrow = LlamaCppModel(path, replace(ROWS, row_sequences=4), batch_size=2)
    tokens, positions, mask = tree_block([[1], [2]], [node_tokens(0), node_tokens(1)])
    with pytest.raises(
        ValueError, match=r"more than 3 root-to-leaf paths; raise LlamaCppConfig\.row_seq"
    ):
        narrow.forward(tokens, positions, mask)
    assert narrow.pending_length == 0  # a refused forward changes nothing
    cells = ROWS.context + ROWS.pending_cells
    prefill(narrow, 1, [0] * 60)
    with pytest.raises(ValueError, match=f"context overflow: row 1: 59 committed.*{cells} KV"):
        narrow.forward_rows(
            [1], torch.zeros(1, 70).long(), 59 + torch.arange(70)[None], chain_mask(70)
        )


# ---------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def pair(tiny_paths):
    return load_pair(
        str(tiny_paths["target"]), str(tiny_paths["draft"]), runtime="llama.cpp", llamacpp=ROWS
    )


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize(
    "case",
    [EngineCase("greedy", "4,2,2", length=6), EngineCase("mcss-wor", "2,2", length=6)],
    ids=lambda c: c.describe().replace(" ", "-"),
)
def test_engine_rows_equal_batch_one(pair, case: EngineCase) -> None:
    """8 jobs through 3 rows (rows join as others finish, ragged prompts), greedy and seeded
    sampling: every job's tokens equal its batch-1 generation."""
    jobs = [((1, 2), 5), ((3,), 6), ((0, 1, 2, 3), 7), ((2, 2, 1), 8)] * 2
    models = (pair.target, pair.draft)
    batched = batch_generations(case, jobs, 3, models=models)
    alone = batch_generations(case, jobs, 1, models=models)
    assert batched == alone
    assert all(len(tokens) == 6 for tokens in batched)


def test_generate_a_list_with_adaptive_tree_equals_target_greedy(pair) -> None:
    """The measured tree budget at 3 rows (whatever tree, or plain steps, it picks): greedy
    output is the target's own."""
    config = SpecConfig(tree="2,2", target=GREEDY, max_new_tokens=10, stop_token_ids=())
    prompts = ["abca", "d", "bcdab"]
    together = generate(pair, prompts, config, batch_size=3, adaptive=True)
    plain = replace(config, tree="none")
    assert [r.token_ids for r in together] == [generate(pair, p, plain).token_ids for p in prompts]


def test_generate_a_list_of_prompts_equals_each_alone(pair) -> None:
    config = SpecConfig(tree="2,2", target=GREEDY, max_new_tokens=8, stop_token_ids=())
    prompts = ["abca", "d", "bcdab"]
    together = generate(pair, prompts, config, batch_size=3)
    assert [r.token_ids for r in together] == [generate(pair, p, config).token_ids for p in prompts]
    sampled = replace(config, target=SamplingConfig(temperature=1.0), seed=4)
    together = generate(pair, prompts, sampled)
    assert [r.token_ids for r in together] == [
        generate(pair, p, sampled).token_ids for p in prompts
    ]


class NeighbourLogits(Engine):
    """Broken: each row is verified against the next row's target logits."""

    def _target_logits(self, requests, proposals, verifiers):
        logits = super()._target_logits(requests, proposals, verifiers)
        return logits[1:] + logits[:1]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("engine_class", [Engine, NeighbourLogits], ids=["engine", "broken"])
def test_batch_of_four_through_llamacpp_is_lossless(pair, engine_class) -> None:
    """Four prompts side by side in 4 rows of llama.cpp: each prompt's sequences against the
    target's own exact distribution; a row reading its neighbour's logits fails the same test."""
    fits = run_batch_engine_case(
        EngineCase("mcss-wor", "4,2,2"),
        TRIALS,
        seed=1,
        models=(pair.target, pair.draft),
        engine_class=engine_class,
    )
    passed = all(fit.passed for fit in fits)
    assert passed is (engine_class is Engine), fits


# ---------------------------------------------------------------------------- server and CLI
def test_server_at_four_rows(pair) -> None:
    """Six concurrent completions through a 4-row server: each equals its single answer."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from mcsd.server.app import create_app

    defaults = SpecConfig(tree="2,2", target=GREEDY, max_new_tokens=6, stop_token_ids=())
    prompts = ["abca", "d", "bcdab", "ca", "dddd", "ab"]
    expected = [generate(pair, p, defaults).text for p in prompts]
    app = create_app(pair, defaults, max_batch=4)
    with TestClient(app) as client:

        def one(prompt: str) -> str:
            body = {"prompt": prompt, "max_tokens": 6, "temperature": 0}
            response = client.post("/v1/completions", json=body)
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["text"]

        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(one, prompts))
        meta = client.get("/v1/models").json()["data"][0]["mcsd"]
    assert answers == expected
    assert meta["max_concurrent_generations"] == 4


@pytest.mark.usefixtures("one_torch_thread")
def test_bench_batch_size_four_on_llamacpp(tiny_paths, tmp_path: Path, capsys) -> None:
    from mcsd.cli import main

    dataset = tmp_path / "prompts.jsonl"
    texts = ["abca", "d", "bcdab", "ca", "dab"]
    dataset.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out = tmp_path / "out"
    argv = ["bench", "--runtime", "llama.cpp", "--threads", "1"]
    argv += ["--target", str(tiny_paths["target"]), "--draft", str(tiny_paths["draft"])]
    argv += ["--dataset", str(dataset), "--max-new-tokens", "6", "--temperature", "0"]
    argv += ["--no-chat", "--out", str(out), "--batch-size", "4"]
    argv += ["--methods", "ar", "sps:2", "tree:2,2"]
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "batch-4.json").read_text())
    assert [r["method"] for r in results] == ["ar", "sps:2", "tree:2,2"]
    assert all(r["batch_size"] == 4 and r["matches_ar"] is True for r in results), results


def test_budget_probe_times_one_row_below_the_batch(single) -> None:
    """llama.cpp computes only the rows a forward is given, so the budget's cost model also
    holds one-row forwards (totals 1 and 2 below 4 rows x 1 token): with one busy row of four,
    a 4-token tree is priced as 4 tokens of one row, not as the 4-row plain step."""
    from mcsd.budget import StepCost, computed_rows

    rows = single.with_rows(4)
    assert computed_rows(rows, [2]) == 1 and computed_rows(rows, [0, 3]) == 2
    cost = StepCost.probe(rows, (1, 2), repeats=1)
    assert cost.tokens == (1, 2, 4, 8) and all(s > 0 for s in cost.seconds)
    assert rows.cache_lengths() == (0, 0, 0, 0)
