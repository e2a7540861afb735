"""The declared runtime protocol (``mcsd.models.base``) on every runtime (float32, CPU).

- every runtime has every member the engine and the budget use (``forward_rows``,
  ``computed_rows``, ``with_rows``, ``num_layers``, ``resizable``, ``returns_hidden``,
  ``forward_hidden``), and says which rows a forward of some rows computes: every row on the toy
  table (padding), the row bucket on hf, hf-static and fast, the rows given on llama.cpp;
- a runtime that holds one row refuses other batch sizes with one clear error naming
  ``batch_size`` and the runtimes that can; bad ``hidden_layers`` name their range;
- hidden states (``forward_hidden``) on hf and fast equal transformers' ``output_hidden_states``
  on the same weights for the tokens scored, on a prefill, a tree forward (each node against its
  root-to-node path read from scratch) and a forward of some rows after ragged prefills; their
  logits and the cache afterwards are those of the plain forward;
- hf-static, llama.cpp and the toy table refuse hidden states, naming the runtime and
  ``hf and fast``; the fast runtime on two tensor-parallel ranks (gloo) returns those of one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_causal_lm

from mcsd.models.base import (
    HIDDEN_RUNTIMES,
    CommittedRows,
    Runtime,
    Scored,
    chain_mask,
    row_bucket,
    rows_forward,
    with_rows,
)
from mcsd.models.cheap import RestrictedVocabModel
from mcsd.models.fast import FastModel, build, read_architecture
from mcsd.models.fast.parallel import ParallelFastModel, Shard, build_shard, launch
from mcsd.models.hf import HFModel
from mcsd.models.static import StaticHFModel
from mcsd.models.toy import TableLM
from mcsd.tree import TokenTree

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 96
LAYERS = (0, 1, -1)  # the embeddings, after block 1, the final norm's output (of 2 layers)
REFERENCE = (0, 1, 2)  # the same in transformers' hidden_states tuple
HIDDEN_KINDS = ("hf", "fast")
MEMBERS = (
    "forward",
    "forward_rows",
    "computed_rows",
    "with_rows",
    "forward_hidden",
    "num_layers",
    "resizable",
    "returns_hidden",
    "commit",
    "reset",
    "cache_lengths",
    "pending_length",
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    model = tiny_causal_lm("qwen2", seed=0, layers=2, vocab=VOCAB)
    directory = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(directory)
    return model, directory


def runtime(checkpoint, kind: str, batch_size: int = 1) -> Runtime:
    model, directory = checkpoint
    if kind == "hf":
        return HFModel(model, batch_size=batch_size)
    if kind == "hf-static":
        return StaticHFModel(model, max_length=128, max_graph_tokens=8, batch_size=batch_size)
    if kind == "table":
        return TableLM.random(VOCAB, batch_size=batch_size)
    cpu = torch.device("cpu")
    arch = read_architecture(directory)
    lm = build(arch, dtype=torch.float32, device=cpu, max_length=128, directory=directory)
    return FastModel(lm, batch_size=batch_size, max_graph_tokens=8, attention_block=16)


def reference_hidden(model, ids: list[int]) -> torch.Tensor:
    """transformers' hidden states of ``ids`` read from scratch, ``[len(REFERENCE), T, H]``."""
    with torch.no_grad():
        states = model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    return torch.stack([states[i][0] for i in REFERENCE])


def tree_block(tree: TokenTree) -> torch.Tensor:
    """The root (last committed token) and the tree's nodes: ``[N + 1, N + 1]``."""
    mask = torch.zeros(tree.num_nodes + 1, tree.num_nodes + 1, dtype=torch.bool)
    mask[:, 0] = True
    mask[1:, 1:] = tree.ancestor_mask()
    return mask


# ---------------------------------------------------------------------------- the members
@pytest.mark.parametrize("kind", ["table", "hf", "hf-static", "fast"])
def test_every_runtime_declares_the_protocol(checkpoint, kind: str) -> None:
    rows = runtime(checkpoint, kind, batch_size=8)
    assert isinstance(rows, Runtime) and all(hasattr(rows, m) for m in MEMBERS)
    assert rows.resizable and rows.returns_hidden == (kind in HIDDEN_KINDS)
    assert rows.num_layers == (None if kind == "table" else 2)
    for subset in ([0], [1, 2], [5], [0, 7]):
        want = 8 if kind == "table" else row_bucket(max(subset) + 1, 8)
        assert rows.computed_rows(subset) == want, (kind, subset)
    four = with_rows(rows, 4)
    assert four.batch_size == 4 and type(four) is type(rows) and with_rows(rows, 8) is rows
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0"):
        with_rows(rows, 0)


def test_the_restricted_vocabulary_draft_is_its_inner_runtime(checkpoint) -> None:
    inner = runtime(checkpoint, "fast", batch_size=4)
    keep = torch.arange(0, VOCAB, 2)
    draft = RestrictedVocabModel(inner.restricted(keep), keep, VOCAB)
    assert draft.computed_rows([1]) == 2 and draft.resizable and draft.returns_hidden
    assert draft.num_layers == 2 and with_rows(draft, 2).batch_size == 2
    out = rows_forward(draft, [1], torch.tensor([[4, 6]]), torch.tensor([[0, 1]]), chain_mask(2))
    assert out.shape == (2, 2, VOCAB) and torch.isinf(out[1, :, 1::2]).all()
    scored = draft.forward_hidden(
        torch.tensor([[8]]), torch.tensor([[2]]), chain_mask(1, 2), hidden_layers=(-1,), rows=[1]
    )
    assert scored.logits.shape == (2, 1, VOCAB) and scored.hidden.shape == (1, 2, 1, 64)


class OneRow(CommittedRows):
    """A runtime that holds one row (declares nothing: ``RuntimeBase``'s defaults)."""

    name = "one-row"

    def __init__(self) -> None:
        super().__init__(1, torch.device("cpu"), torch.float32)


def test_a_runtime_of_one_row_refuses_other_batch_sizes() -> None:
    single = OneRow()
    assert not single.resizable and with_rows(single, 1) is single
    with pytest.raises(ValueError, match="batch_size: runtime one-row holds one row") as error:
        with_rows(single, 2)
    assert "table, hf, hf-static, fast and llama.cpp" in str(error.value)
    assert "batch_size=2" in str(error.value)


@pytest.mark.parametrize("kind", ["table", "hf-static"])
def test_hidden_states_are_refused(checkpoint, kind: str) -> None:
    rows = runtime(checkpoint, kind, batch_size=2)
    tokens, positions = torch.tensor([[1, 2], [3, 4]]), torch.arange(2).expand(2, 2)
    with pytest.raises(ValueError, match="hidden_layers: runtime") as error:
        rows.forward_hidden(tokens, positions, chain_mask(2), hidden_layers=(0,))
    assert rows.name in str(error.value) and f"the {HIDDEN_RUNTIMES} runtimes do" in str(
        error.value
    )
    assert rows.pending_length == 0  # refused before any work


def test_llamacpp_declares_the_protocol_and_refuses_hidden_states(tmp_path: Path) -> None:
    if os.environ.get("MCSD_REQUIRE_LLAMACPP") != "1":
        pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from mcsd.checks.tiny_gguf import TinyGGUF
    from mcsd.config import LlamaCppConfig
    from mcsd.models.llamacpp import LlamaCppModel

    config = LlamaCppConfig(context=64, pending_cells=64, batch=128, sequences=32, threads=1)
    rows = LlamaCppModel(TinyGGUF(seed=1).write(tmp_path / "tiny.gguf"), config, batch_size=4)
    assert isinstance(rows, Runtime) and all(hasattr(rows, m) for m in MEMBERS)
    assert rows.resizable and not rows.returns_hidden and rows.num_layers == 2
    assert rows.computed_rows([1, 3]) == 2 and with_rows(rows, 2).batch_size == 2
    tokens, positions = torch.tensor([[1, 2]]), torch.tensor([[0, 1]])
    with pytest.raises(ValueError, match=r"hidden_layers: runtime llama\.cpp:tiny") as error:
        rows.forward_hidden(tokens, positions, chain_mask(2), hidden_layers=(0,), rows=[1])
    assert f"the {HIDDEN_RUNTIMES} runtimes do" in str(error.value) and rows.pending_length == 0
    out = rows_forward(rows, [1], tokens, positions, chain_mask(2), logits="last")
    assert out.shape == (4, 1, 4) and rows.pending_length == 2
    rows.commit([[], [0, 1], [], []])
    assert rows.cache_lengths() == (0, 2, 0, 0) and rows.pending_length == 0
    rows.reset(1)
    assert rows.cache_lengths() == (0, 0, 0, 0)


@pytest.mark.parametrize("kind", HIDDEN_KINDS)
def test_bad_hidden_layers_name_their_range(checkpoint, kind: str) -> None:
    rows = runtime(checkpoint, kind)
    tokens, positions = torch.tensor([[1]]), torch.tensor([[0]])
    for layers in ((), (3,), (-4,), (True,), (1.0,)):
        with pytest.raises(ValueError, match=r"hidden_layers must be .* in \[-3, 2\]"):
            rows.forward_hidden(tokens, positions, chain_mask(1), hidden_layers=layers)
    assert rows.pending_length == 0


# ---------------------------------------------------------------------------- hidden states
@pytest.mark.parametrize("kind", HIDDEN_KINDS)
def test_hidden_states_of_a_prefill_and_a_tree_equal_transformers(checkpoint, kind: str) -> None:
    """A prefill without logits, then a tree of 6 nodes after the last committed token: every
    token's hidden states equal transformers' on the path that leads to it; the logits and the
    commit are those of the plain forward on a twin runtime."""
    model = checkpoint[0]
    hidden, plain = runtime(checkpoint, kind), runtime(checkpoint, kind)
    prompt = [5, 17, 33, 2, 9, 40, 41]
    ids, positions = torch.tensor([prompt[:-1]]), torch.arange(len(prompt) - 1)[None]
    scored = hidden.forward_hidden(
        ids, positions, chain_mask(len(prompt) - 1), hidden_layers=LAYERS, logits="none"
    )
    assert isinstance(scored, Scored) and scored.logits is None
    assert scored.hidden.shape == (3, 1, len(prompt) - 1, 64)
    reference = reference_hidden(model, prompt[:-1])  # [3, T, H]
    torch.testing.assert_close(scored.hidden[:, 0], reference, atol=1e-4, rtol=0)
    plain.forward(ids, positions, chain_mask(len(prompt) - 1), logits="none")
    hidden.commit()
    plain.commit()

    tree = TokenTree.from_config((2, 2))
    nodes = [3, 60, 7, 11, 5, 23]
    tokens = torch.tensor([[prompt[-1], *nodes]])  # [1, 7]
    depth = len(prompt) - 1 + torch.tensor([0, *tree.depth])[None]  # [1, 7]
    scored = hidden.forward_hidden(tokens, depth, tree_block(tree), hidden_layers=LAYERS)
    assert scored.hidden.shape == (3, 1, 7, 64)
    torch.testing.assert_close(scored.logits, plain.forward(tokens, depth, tree_block(tree)))
    for u in range(tree.num_nodes + 1):
        path, node = [], u
        while node > 0:
            path.insert(0, nodes[node - 1])
            node = tree.parents[node - 1] + 1
        want = reference_hidden(model, prompt + path)[:, -1]  # [3, H]
        torch.testing.assert_close(scored.hidden[:, 0, u], want, atol=1e-4, rtol=0)
    keep = [[0, 2, 6]]  # the root, node 1, node 5
    hidden.commit(keep)
    plain.commit(keep)
    step = torch.tensor([[13]]), torch.tensor([[len(prompt) + 2]]), chain_mask(1)
    torch.testing.assert_close(hidden.forward(*step), plain.forward(*step))


@pytest.mark.parametrize("kind", HIDDEN_KINDS)
def test_hidden_states_of_some_rows_equal_transformers(checkpoint, kind: str) -> None:
    """Four rows prefilled to different lengths one at a time; a forward of rows 1 and 2 only
    returns each row's hidden states (indexed by runtime row) as transformers reads its text
    alone, and the same logits as ``rows_forward``."""
    model = checkpoint[0]
    hidden, plain = runtime(checkpoint, kind, 4), runtime(checkpoint, kind, 4)
    texts = [[5, 9, 11, 4], [3, 70, 2], [40, 41, 42, 43, 44, 45], [7, 7]]
    for row, text in enumerate(texts):
        for model_rows in (hidden, plain):
            ids, positions = torch.tensor([text]), torch.arange(len(text))[None]
            rows_forward(model_rows, [row], ids, positions, chain_mask(len(text)), logits="none")
            model_rows.commit([list(range(len(text))) if r == row else [] for r in range(4)])
    subset = [1, 2]
    tokens = torch.tensor([[8, 9], [10, 11]])  # [2, 2]
    positions = torch.tensor([[len(texts[r]), len(texts[r]) + 1] for r in subset])
    scored = hidden.forward_hidden(
        tokens, positions, chain_mask(2), hidden_layers=LAYERS, rows=subset
    )
    want_logits = rows_forward(plain, subset, tokens, positions, chain_mask(2))
    bucket = hidden.computed_rows(subset)
    assert scored.hidden.shape == (3, bucket, 2, 64) and scored.logits.shape[0] == bucket
    for i, row in enumerate(subset):
        torch.testing.assert_close(scored.logits[row], want_logits[row])
        want = reference_hidden(model, texts[row] + tokens[i].tolist())[:, -2:]  # [3, 2, H]
        torch.testing.assert_close(scored.hidden[:, row], want, atol=1e-4, rtol=0)
    assert hidden.pending_length == 2 and hidden.cache_lengths() == plain.cache_lengths()


def tree_hidden(runtime: Runtime) -> Scored:
    """A prefill of 6 tokens, then the tree (2, 2) after the last, with hidden states."""
    prompt = torch.tensor([[5, 17, 33, 2, 9, 40]])
    runtime.forward(prompt, torch.arange(6)[None], chain_mask(6), logits="none")
    runtime.commit()
    tree = TokenTree.from_config((2, 2))
    tokens = torch.tensor([[41, 3, 60, 7, 11, 5, 23]])
    positions = 6 + torch.tensor([0, *tree.depth])[None]
    return runtime.forward_hidden(tokens, positions, tree_block(tree), hidden_layers=LAYERS)


def hidden_worker(rank: int, world: int, directory: str) -> Scored:
    arch = read_architecture(directory)
    shard = Shard(rank, world)
    cpu = torch.device("cpu")
    lm = build_shard(
        arch, shard, dtype=torch.float32, device=cpu, max_length=128, directory=directory
    )
    return tree_hidden(ParallelFastModel(lm, shard, vocab_size=arch.vocab_size, max_graph_tokens=8))


def test_hidden_states_on_two_tensor_parallel_ranks_equal_one(checkpoint) -> None:
    directory = checkpoint[1]
    two = launch(hidden_worker, 2, (str(directory),), device=torch.device("cpu"))
    one = tree_hidden(runtime(checkpoint, "fast"))
    torch.testing.assert_close(two.hidden, one.hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(two.logits, one.logits, atol=1e-5, rtol=0)
