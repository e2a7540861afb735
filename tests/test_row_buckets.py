"""Row buckets of the torch runtimes (hf, and the static slot cache of hf-static and fast;
float32, CPU).

A forward of some rows (``rows_forward`` -> ``forward_rows``) computes only the first ``b`` rows
of the cache, ``b`` the smallest power of two (or the batch) holding the highest row given:

- the bucket sizes, and the batch each subset actually runs at;
- after ragged prefills and commits, every subset's logits equal each row computed alone on a
  one-row runtime, the rows beyond the bucket untouched (their next forward is unchanged);
- through the batch engine, rows joining late and finishing at different steps (so the busy
  rows change every few steps) give each prompt its batch-1 output, greedy (equal to
  transformers' ``generate``) and seeded at temperature 1;
- a deliberately broken runtime that packs the given rows into the first rows (each reading
  another row's cache) fails the same test.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import greedy_reference, tiny_causal_lm

from mcsd.budget import computed_rows
from mcsd.config import SamplingConfig, SpecConfig
from mcsd.draft.proposer import Drafter
from mcsd.engine import Engine, speculative_decode
from mcsd.models.base import chain_mask, row_bucket, row_buckets, rows_forward
from mcsd.models.fast import FastModel, build, read_architecture
from mcsd.models.hf import HFModel
from mcsd.models.static import StaticHFModel

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 96
KINDS = ("hf", "hf-static", "fast")


def test_row_buckets() -> None:
    assert [row_bucket(r, 16) for r in range(1, 17)] == [1, 2, 4, 4, *[8] * 4, *[16] * 8]
    assert row_buckets(16) == [1, 2, 4, 8, 16]
    assert row_buckets(12) == [1, 2, 4, 8, 12]
    assert row_buckets(1) == [1]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[object, Path]]:
    out = {}
    for name, seed, layers in (("target", 0, 2), ("draft", 1, 1)):
        model = tiny_causal_lm("qwen2", seed=seed, layers=layers, vocab=VOCAB)
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        out[name] = (model, directory)
    return out


def runtime(models, kind: str, name: str, batch_size: int, cls=None):
    model, directory = models[name]
    if kind == "hf":
        return (cls or HFModel)(model, batch_size=batch_size)
    if kind == "hf-static":
        cls = cls or StaticHFModel
        return cls(
            model, max_length=128, attention_block=16, max_graph_tokens=8, batch_size=batch_size
        )
    cpu = torch.device("cpu")
    lm = build(
        read_architecture(directory),
        dtype=torch.float32,
        device=cpu,
        max_length=128,
        directory=directory,
    )
    return (cls or FastModel)(lm, batch_size=batch_size, max_graph_tokens=8, attention_block=16)


class Recorder:
    """Wraps a runtime's ``_forward`` to record the batch of every forward it computes, and of
    those returning logits (``steps``: not the prefills)."""

    def __init__(self, runtime) -> None:
        self.batches: list[int] = []
        self.steps: list[int] = []
        forward = runtime._forward

        def recorded(tokens, positions, tree_mask, logits):
            self.batches.append(tokens.shape[0])
            if logits != "none":
                self.steps.append(tokens.shape[0])
            return forward(tokens, positions, tree_mask, logits)

        runtime._forward = recorded


@pytest.mark.parametrize("kind", KINDS)
def test_subsets_equal_each_row_alone(models, kind: str) -> None:
    """Eight rows, six of them prefilled to different lengths one at a time; then forwards of
    several subsets (a chain, then a tree step) equal the same rows alone, and run at the row
    bucket of their highest row."""
    rows = runtime(models, kind, "target", 8)
    alone = [runtime(models, kind, "target", 1) for _ in range(8)]
    seqs = torch.randint(0, VOCAB, (8, 40), generator=torch.Generator().manual_seed(5))
    lengths = [9, 3, 12, 5, 7, 1, 0, 0]
    recorder = Recorder(rows)
    for row, length in enumerate(lengths):
        if length:
            ids, positions = seqs[row : row + 1, :length], torch.arange(length)[None]
            rows_forward(rows, [row], ids, positions, chain_mask(length), logits="none")
            rows.commit([list(range(length)) if r == row else [] for r in range(8)])
            alone[row].forward(ids, positions, chain_mask(length), logits="none")
            alone[row].commit()
    assert rows.cache_lengths() == tuple(lengths)
    assert recorder.batches == [1, 2, 4, 4, 8, 8]
    recorder.batches.clear()
    for subset in ([0], [1], [0, 2], [3], [2, 5], [0, 1, 2, 3, 4, 5]):
        ids = torch.stack([seqs[r, lengths[r] : lengths[r] + 3] for r in subset])  # [R, 3]
        positions = torch.tensor([[lengths[r] + i for i in range(3)] for r in subset])
        out = rows_forward(rows, subset, ids, positions, chain_mask(3))
        assert out.shape[0] >= computed_rows(rows, subset) > max(subset)
        for i, r in enumerate(subset):
            want = alone[r].forward(ids[i : i + 1], positions[i : i + 1], chain_mask(3))
            alone[r].commit([[0, 2]])  # a ragged commit, the same in both
            torch.testing.assert_close(out[r], want[0], atol=1e-5, rtol=0)
        rows.commit([[0, 2] if r in subset else [] for r in range(8)])
        for r in subset:
            lengths[r] += 2
        assert rows.cache_lengths() == tuple(lengths)
    assert recorder.batches == [1, 2, 4, 4, 8, 8]


def generate_rows(engine: Engine, prompts, spec: SpecConfig) -> list[list[int]]:
    """``prompts`` through the engine's rows as they free up (late joins), one seed and length
    each."""
    requests = [
        engine.add_request(prompt, replace(spec, seed=job, max_new_tokens=LENGTHS[job]))
        for job, prompt in enumerate(prompts)
    ]
    while engine.has_unfinished():
        engine.step()
    return [request.output_ids for request in requests]


PROMPTS = [[5, 9, 11], [3], [40, 41, 42, 43, 44, 45, 46], [7, 7], [90, 1, 2, 3], [12, 13]]
LENGTHS = [30, 5, 9, 3, 14, 7]  # rows finish at different steps: the busy subset changes


def engine_outputs(models, kind: str, temperature: float, cls=None) -> list[list[int]]:
    spec = SpecConfig(tree="3,2", target=SamplingConfig(temperature=temperature))
    target = runtime(models, kind, "target", 4, cls)
    draft = runtime(models, kind, "draft", 4, cls)
    engine = Engine(target, Drafter(draft, vocab_size=VOCAB), vocab_size=VOCAB)
    recorder = Recorder(target)
    outputs = generate_rows(engine, PROMPTS, spec)
    assert min(recorder.steps) == 1  # the busy rows changed: smaller buckets ran
    return outputs


def alone_outputs(models, kind: str, temperature: float) -> list[list[int]]:
    spec = SpecConfig(tree="3,2", target=SamplingConfig(temperature=temperature))
    out = []
    for i, prompt in enumerate(PROMPTS):
        row_spec = replace(spec, seed=i, max_new_tokens=LENGTHS[i])
        target, draft = runtime(models, kind, "target", 1), runtime(models, kind, "draft", 1)
        proposer = Drafter(draft, vocab_size=VOCAB)
        steps = speculative_decode(target, proposer, prompt, row_spec, vocab_size=VOCAB)
        out.append([t for step in steps for t in step.tokens])
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_rows_equal_batch_one(models, kind: str, temperature: float) -> None:
    alone = alone_outputs(models, kind, temperature)
    if temperature == 0.0:
        target_lm = models["target"][0]
        pairs = zip(PROMPTS, LENGTHS, strict=True)
        assert alone == [greedy_reference(target_lm, p, n) for p, n in pairs]
    assert engine_outputs(models, kind, temperature) == alone


class Packed(StaticHFModel):
    """Broken on purpose: runs the rows given in the first rows of the cache (row 2's tokens on
    row 0's cache), without padding them into place."""

    @torch.inference_mode()
    def forward_rows(self, rows, tokens, positions, tree_mask, *, logits="all"):
        out = self._forward(tokens, positions, tree_mask, logits)
        if out is None:
            return None
        spread = torch.zeros(self.batch_size, *out.shape[1:])
        spread[list(rows)] = out
        return spread


def test_a_runtime_reading_the_wrong_rows_cache_is_caught(models) -> None:
    assert engine_outputs(models, "hf-static", 0.0, Packed) != alone_outputs(
        models, "hf-static", 0.0
    )
