"""Tensor parallelism of the fast runtime (mcsd.models.fast.parallel) on gloo, float32, CPU.

One group of 2 and one of 4 processes (this process is rank 0, ``launch`` spawns the others),
each running every check in one go: for tiny random Llama (vocabulary 98: padded for 4 ranks)
and Qwen2 (QKV bias, tied embeddings) configs with 8 heads and 4 KV heads, the logits of a
prefill, one-token steps and a tree forward equal TP = 1 to 1e-5; greedy speculative output
equals TP = 1, also as rows of a batch engine (``with_rows`` keeps the shard); seeded sampled
output is the same on every rank and equals TP = 1; and with
``check_ranks`` a rank fed a different token is caught, on every rank, naming the step. The
bad ``tp`` values are refused with one clear error each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_lm, spec_tokens, tiny_causal_lm
from safetensors.torch import load_file
from test_bench_e2e import tiny_tokenizer

from mcsd.api import load_pair
from mcsd.cli import main
from mcsd.config import GREEDY, ParallelConfig, SamplingConfig, SpecConfig
from mcsd.draft.proposer import Drafter
from mcsd.engine import Engine
from mcsd.models.base import chain_mask, with_rows
from mcsd.models.fast import FastModel, build, read_architecture
from mcsd.models.fast.parallel import (
    ParallelFastModel,
    RankMismatch,
    Shard,
    build_shard,
    check_tp,
    launch,
    read_shard,
    shard_state,
)
from mcsd.tree import TokenTree

pytest.importorskip("transformers")
# one xdist worker: the module fixture runs the 2- and 4-rank groups once, and this process
# joins process groups (rank 0)
pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.xdist_group("tensor-parallel"),
]
VOCABS = {"llama": 98, "qwen2": 96}
HEADS = {"num_attention_heads": 8, "num_key_value_heads": 4}
GREEDY_SPEC = SpecConfig(tree=(2, 2, 1), target=GREEDY, max_new_tokens=24)
SAMPLED_SPEC = SpecConfig(
    tree=(2, 2, 1), target=SamplingConfig(temperature=1.0), max_new_tokens=24, seed=3
)
PROMPT = [3, 14, 15, 92, 65, 35]


def save_pair(root: Path, family: str) -> tuple[Path, Path]:
    """A tiny target (2 layers) and draft (1 layer) checkpoint of ``family``."""
    extra = {"tie_word_embeddings": True} if family == "qwen2" else {}
    vocab = VOCABS[family]
    paths = []
    for name, seed, layers in (("target", 0, 2), ("draft", 1, 1)):
        model = tiny_causal_lm(family, seed=seed, layers=layers, vocab=vocab, **HEADS, **extra)
        path = root / f"{family}-{name}"
        model.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


def replicated(directory: Path) -> FastModel:
    """The whole model on one process (TP = 1, and the draft every rank holds)."""
    arch = read_architecture(directory)
    cpu = torch.device("cpu")
    lm = build(arch, dtype=torch.float32, device=cpu, max_length=128, directory=directory)
    return FastModel(lm, max_graph_tokens=8)


def tree_block(tree: TokenTree) -> torch.Tensor:
    mask = torch.zeros(tree.num_nodes + 1, tree.num_nodes + 1, dtype=torch.bool)
    mask[:, 0] = True
    mask[1:, 1:] = tree.ancestor_mask()
    return mask


def logits_run(runtime: FastModel, vocab: int) -> list[torch.Tensor]:
    """A prefill, two one-token steps and a tree forward, committing between them."""
    seq = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    outs = [runtime.forward(seq[:, :12], torch.arange(12)[None], chain_mask(12))]
    runtime.commit()
    for t in (12, 13):
        outs.append(runtime.forward(seq[:, t : t + 1], torch.tensor([[t]]), chain_mask(1)))
        runtime.commit()
    tree = TokenTree.from_config((2, 2))
    tokens = torch.cat([seq[0, 14:15], torch.tensor([3, 9, 7, 11, 5, 2])])[None]  # [1, 7]
    positions = (14 + torch.tensor([0, *tree.depth]))[None]
    outs.append(runtime.forward(tokens, positions, tree_block(tree)))
    runtime.commit([[0, 2, 6]])
    outs.append(runtime.forward(seq[:, :1], torch.tensor([[17]]), chain_mask(1), logits="last"))
    return outs


def rows_run(target: FastModel, draft: FastModel, vocab: int) -> list[list[int]]:
    """Two prompts as rows of one batch engine (copies of two rows: ``with_rows``), greedy."""
    engine = Engine(
        with_rows(target, 2),
        Drafter(with_rows(draft, 2), vocab_size=vocab),
        vocab_size=vocab,
    )
    requests = [engine.add_request(prompt, GREEDY_SPEC) for prompt in (PROMPT, PROMPT[:3])]
    while engine.has_unfinished():
        engine.step()
    return [request.output_ids for request in requests]


def runs(target: FastModel, draft_dir: Path, vocab: int) -> dict[str, object]:
    out: dict[str, object] = {"logits": logits_run(target, vocab)}
    for key, spec in (("greedy", GREEDY_SPEC), ("sampled", SAMPLED_SPEC)):
        target.reset()
        out[key] = spec_tokens(target, replicated(draft_dir), PROMPT, spec, vocab)
    out["rows"] = rows_run(target, replicated(draft_dir), vocab)
    return out


def desynchronised(target: ParallelFastModel, rank: int) -> str:
    """A prefill in which rank 1 was fed another token: the message every rank raises (the
    step count replaced by ``N`` when it is this forward's)."""
    target.reset()
    step = f"step {target.steps + 1} "
    tokens = torch.tensor([[1, 2, 3, 4 + (rank == 1)]])
    try:
        target.forward(tokens, torch.arange(4)[None], chain_mask(4))
    except RankMismatch as error:
        return str(error).replace(step, "step N ")
    return "not caught"


def worker(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    shard = Shard(rank, world)
    results = {}
    for family, vocab in VOCABS.items():
        target_dir, draft_dir = Path(root) / f"{family}-target", Path(root) / f"{family}-draft"
        cpu = torch.device("cpu")
        arch = read_architecture(target_dir)
        lm = build_shard(
            arch, shard, dtype=torch.float32, device=cpu, max_length=128, directory=target_dir
        )
        target = ParallelFastModel(
            lm, shard, vocab_size=vocab, check_ranks=True, max_graph_tokens=8
        )
        results[family] = runs(target, draft_dir, vocab) | {
            "mismatch": desynchronised(target, rank)
        }
    torch.save(results, Path(root) / f"rank{rank}-of-{world}.pt")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    root = tmp_path_factory.mktemp("tp")
    out = {}
    for family, vocab in VOCABS.items():
        target_dir, draft_dir = save_pair(root, family)
        out[family] = runs(replicated(target_dir), draft_dir, vocab)
    return root, out


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_equals_one_process(reference, world: int) -> None:
    root, single = reference
    launch(worker, world, (str(root),), device=torch.device("cpu"))
    ranks = [torch.load(root / f"rank{r}-of-{world}.pt") for r in range(world)]
    for family in VOCABS:
        one = single[family]
        for rank, result in enumerate(ranks):
            got = result[family]
            for a, b in zip(got["logits"], one["logits"], strict=True):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            assert got["greedy"] == one["greedy"], (family, rank)
            assert got["sampled"] == one["sampled"], (family, rank)
            assert got["rows"] == one["rows"] and got["rows"][0] == one["greedy"], (family, rank)
            assert len(got["sampled"]) == SAMPLED_SPEC.max_new_tokens
            assert got["mismatch"] == (
                "tensor-parallel ranks disagree at step N on the tokens: rank 0 vs rank(s) 1"
            ), (family, rank)


def test_bad_tp_is_refused(reference) -> None:
    root, _ = reference
    arch = read_architecture(root / "llama-target")
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"tp=3 must divide the model's attention heads \(8\)"):
        check_tp(arch, 3, cpu)
    with pytest.raises(ValueError, match=r"tp=8 must divide the model's KV heads \(4\)"):
        check_tp(arch, 8, cpu)
    with pytest.raises(ValueError, match=r"tp must be an integer >= 1, got 0"):
        check_tp(arch, 0, cpu)
    with pytest.raises(ValueError, match=r"tp must be an integer >= 1, got -2"):
        ParallelConfig(size=-2)
    with pytest.raises(ValueError, match=r"tp=2 exceeds the visible GPUs \(0\)"):
        if torch.cuda.device_count() >= 2:
            pytest.skip("this machine has two GPUs")
        check_tp(arch, 2, torch.device("cuda"))
    with pytest.raises(ValueError, match=r"tp must be an integer >= 1, got 0"):
        launch(worker, 0, (), device=cpu)
    with pytest.raises(ValueError, match=r"tp=2 needs runtime fast \(or auto\), got 'hf'"):
        load_pair(str(root / "llama-target"), runtime="hf", device="cpu", tp=2)
    with pytest.raises(ValueError, match=r"tp=2 needs 2 processes"):
        load_pair(str(root / "llama-target"), str(root / "llama-draft"), device="cpu", tp=2)


def test_cli_generate_on_two_ranks_equals_one(tmp_path: Path, capsys) -> None:
    """``mcsd generate --tp 2`` (this process rank 0, one rank spawned, ranks checked every
    step): the greedy tokens of ``--tp 1``; bad values are one-line errors."""
    tokenizer = tiny_tokenizer()
    options = dict(hidden=32, max_positions=512, **HEADS)
    target = save_tiny_lm(tmp_path / "target", tokenizer, seed=0, layers=2, **options)
    draft = save_tiny_lm(tmp_path / "draft", tokenizer, seed=1, layers=1, **options)
    argv = ["generate", "def add(a, b):", "--target", str(target), "--draft", str(draft)]
    argv += ["--runtime", "fast", "--device", "cpu", "--dtype", "float32", "--tree", "2,2"]
    argv += ["--temperature", "0", "--max-new-tokens", "16", "--json", "--check-ranks"]
    outs = []
    for tp in ("1", "2"):
        assert main([*argv, "--tp", tp]) == 0
        outs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert outs[0] == outs[1] and len(outs[0]) == 16
    for tp, runtime, message in (
        ("0", "fast", "tp must be an integer >= 1, got 0"),
        ("2", "hf", "tp=2 needs runtime fast (or auto), got 'hf'"),
    ):
        assert main([*argv, "--tp", tp, "--runtime", runtime]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"mcsd generate: error: {message}"
        )


def test_slices_of_memory_equal_slices_read_from_disk(reference) -> None:
    """``shard_state`` (a live state dict) and ``read_shard`` (safetensors slices) agree; the
    vocabulary rows past 98 are zero padding on the last of 4 ranks."""
    root, _ = reference
    directory = root / "llama-target"
    arch = read_architecture(directory)
    state = load_file(directory / "model.safetensors")
    for rank in range(4):
        shard = Shard(rank, 4)
        memory, disk = shard_state(arch, state, shard), read_shard(directory, arch, shard)
        assert memory.keys() == disk.keys() == state.keys()
        for name in state:
            torch.testing.assert_close(memory[name], disk[name], atol=0, rtol=0)
        head = disk["lm_head.weight"]  # [25, D]: rows 75..99 of a 98-row head
        assert head.shape[0] == 25
        assert bool(head[23:].eq(0).all()) == (rank == 3)
