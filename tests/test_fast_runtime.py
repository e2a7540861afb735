"""The fast runtime (mcsd.models.fast) against transformers, float32, CPU.

For tiny random configs of every supported family (Llama with and without llama3 rope
scaling, Qwen2 with QKV bias and tied embeddings, Qwen3 with q/k norms and an explicit
head_dim, Mistral): logits equal transformers' to 1e-4 for a prefill, one-token steps, a tree
forward against the equivalent chain forwards, and after a commit; greedy speculative output
equals transformers ``generate()``; the whole engine stays lossless with it in the loop;
unsupported checkpoints are refused with one clear error before any weight is read; and after
``warmup`` a compiled run never compiles again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from conftest import greedy_reference, spec_tokens, tiny_causal_lm

from mcsd.config import GREEDY, SamplingConfig, SpecConfig
from mcsd.models.base import chain_mask
from mcsd.models.fast import FastModel, build, load_fast, read_architecture
from mcsd.models.hf import HFModel
from mcsd.tree import TokenTree

transformers = pytest.importorskip("transformers")
VOCAB = 96
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def family_model(family: str, seed: int = 0, layers: int = 2):
    """A tiny random checkpoint of ``family`` (transformers model, float32)."""
    if family == "llama3":
        rope = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return tiny_causal_lm("llama", seed=seed, layers=layers, vocab=VOCAB, rope_scaling=rope)
    if family == "qwen2":
        return tiny_causal_lm(
            "qwen2", seed=seed, layers=layers, vocab=VOCAB, tie_word_embeddings=True
        )
    if family == "llama":
        return tiny_causal_lm("llama", seed=seed, layers=layers, vocab=VOCAB)
    classes = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 24}),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
    }
    config_class, model_class, extra = classes[family]
    config = config_class(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="sdpa",
        sliding_window=None,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


FAMILIES = ("llama", "llama3", "qwen2", "qwen3", "mistral")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[object, Path]]:
    out = {}
    for family in FAMILIES:
        model = family_model(family)
        directory = tmp_path_factory.mktemp(family)
        model.save_pretrained(directory)
        out[family] = (model, directory)
    return out


def fast(directory: Path, max_length: int = 128, **options) -> FastModel:
    """The checkpoint on the fast runtime (float32, CPU), small buckets by default."""
    arch = read_architecture(directory)
    cpu = torch.device("cpu")
    lm = build(arch, dtype=torch.float32, device=cpu, max_length=max_length, directory=directory)
    return FastModel(lm, **({"max_graph_tokens": 16} | options))


def tree_block(tree: TokenTree) -> torch.Tensor:
    mask = torch.zeros(tree.num_nodes + 1, tree.num_nodes + 1, dtype=torch.bool)
    mask[:, 0] = True
    mask[1:, 1:] = tree.ancestor_mask()
    return mask


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(checkpoints, family: str) -> None:
    model, directory = checkpoints[family]
    runtime = fast(directory, max_graph_tokens=8)
    assert read_architecture(directory).family == ("llama" if family == "llama3" else family)
    seq = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        chain = model(seq).logits  # [1, 30, V]
    out = runtime.forward(seq[:, :12], torch.arange(12)[None], chain_mask(12))  # prefill
    torch.testing.assert_close(out, chain[:, :12], atol=1e-4, rtol=0)
    runtime.commit()
    for t in (12, 13):  # one-token steps (bucket 1)
        out = runtime.forward(seq[:, t : t + 1], torch.tensor([[t]]), chain_mask(1))
        torch.testing.assert_close(out[0, 0], chain[0, t], atol=1e-4, rtol=0)
        runtime.commit()
    tree = TokenTree.from_config((2, 2))  # node 1 then its child 5 carry the true text
    nodes = torch.tensor([3, seq[0, 15], 7, 11, 5, seq[0, 16]])
    tokens = torch.cat([seq[0, 14:15], nodes])[None]  # [1, 7] padded to 8
    out = runtime.forward(tokens, (14 + torch.tensor([0, *tree.depth]))[None], tree_block(tree))
    for row, position in ((0, 14), (2, 15), (6, 16)):
        torch.testing.assert_close(out[0, row], chain[0, position], atol=1e-4, rtol=0)
    runtime.commit([[0, 1 + 1, 1 + 5]])
    assert runtime.cache_lengths() == (17,)
    out = runtime.forward(seq[:, 17:30], torch.arange(17, 30)[None], chain_mask(13))  # > 8: eager
    torch.testing.assert_close(out, chain[:, 17:30], atol=1e-4, rtol=0)
    runtime.commit()
    last = runtime.forward(seq[:, :1], torch.tensor([[30]]), chain_mask(1), logits="last")
    assert last.shape == (1, 1, VOCAB)
    assert (
        runtime.forward(seq[:, :1], torch.tensor([[31]]), chain_mask(2)[1:], logits="none") is None
    )


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_ragged_rows_equal_the_hf_runtime(checkpoints, family: str) -> None:
    model, directory = checkpoints[family]
    lm = fast(directory).lm
    runtimes = (FastModel(lm, batch_size=2, max_graph_tokens=8), HFModel(model, batch_size=2))
    seqs = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(3))
    tree = TokenTree.from_config((2, 1))
    offsets = torch.tensor([0, *tree.depth])
    outs = []
    for runtime in runtimes:
        runtime.forward(seqs[:, :9], torch.arange(9).expand(2, 9), chain_mask(9))
        runtime.commit([list(range(9)), list(range(5))])
        tokens = torch.stack([seqs[0, 9:14], seqs[1, 5:10]])
        first = runtime.forward(tokens, torch.tensor([[9], [5]]) + offsets, tree_block(tree))
        runtime.commit([[0, 2], [0, 1, 3]])
        tokens = torch.stack([seqs[0, 11:13], seqs[1, 8:10]])
        second = runtime.forward(tokens, torch.tensor([[11, 12], [8, 9]]), chain_mask(2))
        outs.append((first, second))
    for a, b in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("tree", [(1, 1, 1, 1), (4, 2, 2)])
def test_greedy_speculation_equals_generate(checkpoints, family: str, tree) -> None:
    model, directory = checkpoints[family]
    draft_model = family_model(family, seed=1, layers=1)
    draft_dir = directory.parent / f"{directory.name}-draft"
    draft_model.save_pretrained(draft_dir)
    prompt = [3, 14, 15, 92, 65, 35]
    reference = greedy_reference(model, prompt, 40)
    spec = SpecConfig(tree=tree, target=GREEDY, max_new_tokens=40)
    assert spec_tokens(fast(directory), fast(draft_dir), prompt, spec, VOCAB) == reference


def test_seeded_sampling_equals_the_hf_runtime(checkpoints) -> None:
    """The same seed, the same logits (to float rounding): the same tokens as on hf."""
    model, directory = checkpoints["qwen2"]
    draft = family_model("qwen2", seed=1, layers=1)
    draft_dir = directory.parent / "qwen2-sampling-draft"
    draft.save_pretrained(draft_dir)
    spec = SpecConfig(
        tree=(2, 2, 1), target=SamplingConfig(temperature=1.0), max_new_tokens=30, seed=3
    )
    prompt = [5, 17, 33, 2, 9]
    on_fast = spec_tokens(fast(directory), fast(draft_dir), prompt, spec, VOCAB)
    on_hf = spec_tokens(HFModel(model), HFModel(draft), prompt, spec, VOCAB)
    assert on_fast == on_hf and len(on_fast) == 30


def test_unsupported_checkpoints_are_refused(tmp_path: Path) -> None:
    for config, why in (
        ({"model_type": "gpt2"}, "not a Llama-family model type"),
        ({"model_type": "mistral", "sliding_window": 4096}, "sliding-window"),
        ({"model_type": "qwen2", "use_sliding_window": True}, "sliding-window"),
        (
            {"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
            "rope type 'yarn'",
        ),
        ({"model_type": "llama", "hidden_act": "gelu"}, "activation"),
    ):
        base = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 1}
        base |= {"intermediate_size": 128, "vocab_size": 10}
        (tmp_path / "config.json").write_text(json.dumps(base | config))
        with pytest.raises(ValueError, match=why) as error:
            load_fast(tmp_path, dtype=torch.float32, device=torch.device("cpu"))
        assert "use runtime 'hf'" in str(error.value) and "\n" not in str(error.value)


def test_missing_weights_are_refused(checkpoints, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    _, directory = checkpoints["llama"]
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    weights = load_file(directory / "model.safetensors")
    weights.pop("model.layers.1.mlp.up_proj.weight")
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"no weight 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_fast(tmp_path, dtype=torch.float32, device=torch.device("cpu"))


def test_no_recompilation_after_warmup(checkpoints) -> None:
    """Compiled (a counting backend stands in for inductor): warm-up compiles each bucket once,
    then a whole speculative generation compiles nothing."""
    compiled: list[int] = []

    def counting(graph, inputs):
        compiled.append(len(inputs))
        return graph.forward

    _, directory = checkpoints["qwen2"]
    lm = fast(directory).lm
    target, draft = FastModel(lm, max_graph_tokens=32), FastModel(lm, max_graph_tokens=32)
    for runtime in (target, draft):
        runtime._run = torch.compile(
            runtime._hidden, backend=counting, fullgraph=True, dynamic=False
        )
    tree = TokenTree.from_config((4, 2, 2))
    assert target.warmup((tree.num_nodes + 1, 1)) == [1, 32]
    assert draft.warmup((1, 2, 4, 8)) == [1, 2, 4, 8]
    before = len(compiled)
    assert before >= 2
    spec = SpecConfig(tree=tree, target=GREEDY, max_new_tokens=24)
    out = spec_tokens(target, draft, [3, 14, 15, 9], spec, VOCAB)
    assert len(out) == 24
    assert len(compiled) == before  # no shape the warm-up missed


def test_reduced_vocabulary_draft_stays_lossless(checkpoints) -> None:
    """+fr on the fast runtime: the draft's head scores only the kept rows; greedy output is
    still the target's, and the restricted draft never proposes a token outside them."""
    from mcsd.models.cheap import cheap_draft

    model, directory = checkpoints["qwen2"]

    class Tokenizer:
        all_special_ids = (0,)
        added_tokens_decoder: ClassVar[dict] = {}

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[ord(c) % VOCAB for c in text] for text in texts]}

    draft = cheap_draft(fast(directory), Tokenizer(), vocab=20, texts=["abcdefghij" * 5])
    assert draft.vocab_size == VOCAB and len(draft.keep) == 20
    prompt = [3, 14, 15, 92, 65, 35]
    spec = SpecConfig(tree=(2, 1, 1), target=GREEDY, max_new_tokens=30)
    assert spec_tokens(fast(directory), draft, prompt, spec, VOCAB) == greedy_reference(
        model, prompt, 30
    )
    with pytest.raises(ValueError, match="no int8 weights yet"):
        cheap_draft(fast(directory), Tokenizer(), int8=True)
