"""The trained draft head (``mcsd.draft.head``) and its trainer (``mcsd.draft.train``) on a tiny
random target whose training data it generated itself (so the head has something to learn):
training lowers the loss and raises held-out top-1, save -> load is exact, a resumed run
continues with the same losses, a head for another target is refused, bad configs name their
field, the JSONL reader, and ``mcsd train-head`` end to end on a tiny checkpoint directory."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_lm

from mcsd.cli import main
from mcsd.draft.head import (
    DraftHead,
    HeadConfig,
    load_head,
    read_head_config,
    save_head,
    target_parts,
    weights_sha256,
)
from mcsd.draft.train import (
    TrainConfig,
    evaluate,
    read_jsonl_chats,
    render,
    target_pass,
    token_windows,
    train,
)
from mcsd.errors import ParamError
from mcsd.models.fast import build
from mcsd.models.fast.arch import Architecture, Rope
from mcsd.sources.packaged import DatasetError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB, SEQ = 64, 24
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# small and quick; the tests that need more steps say so
FAST = TrainConfig(steps=6, batch_size=4, seq_len=SEQ, lr=3e-3, warmup=2, validation=8)


@pytest.fixture(scope="module")
def target():
    """A 2-layer random Qwen2-shaped TransformerLM, its head scaled so that its next-token
    distributions are far from uniform."""
    arch = Architecture(
        family="qwen2",
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        intermediate_size=64,
        rms_norm_eps=1e-6,
        rope=Rope(10000.0),
        qkv_bias=True,
        qk_norm=False,
        tied_embeddings=False,
        max_positions=64,
    )
    lm = build(arch, dtype=torch.float32, device=torch.device("cpu"), max_length=64, seed=1)
    with torch.no_grad():
        lm.head.weight.mul_(20.0)
    return lm


@pytest.fixture(scope="module")
def windows(target) -> torch.Tensor:
    """``[48, SEQ]`` sequences sampled from the target (temperature 1): data it would write."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(VOCAB, (48, 1), generator=generator)
    with torch.no_grad():
        for _ in range(SEQ - 1):
            _, logits = target_pass(target, tokens, (target.arch.num_layers,))
            p = torch.softmax(logits[:, -1], dim=-1)  # [N, V]
            tokens = torch.cat([tokens, torch.multinomial(p, 1, generator=generator)], dim=1)
    return tokens


def test_training_lowers_loss_and_raises_held_out_top1(target, windows) -> None:
    config = replace(FAST, steps=40, batch_size=8)
    head_config = HeadConfig(target="t", target_sha256="", arch=target.arch)
    untrained = DraftHead(head_config, target_parts(target))
    untrained.init_weights(config.seed)
    before = evaluate(untrained, target, windows[-config.validation :], config)
    result = train(target, windows, config, target_name="t")
    after = result.validation
    assert result.losses[-1] < 0.6 * result.losses[0]
    assert after["loss"] < 0.6 * before["loss"]
    assert after["top1"] > before["top1"] + 0.1, (before, after)
    assert after["accepted"] > before["accepted"]


def test_save_load_round_trip_is_exact(target, windows, tmp_path: Path) -> None:
    # several feature layers: the fusion layer is saved too
    config = replace(FAST, steps=3, feature_layers=(0, 1, 2), ttt_steps=1)
    result = train(target, windows, config, target_name="t", target_sha256="ab" * 32)
    save_head(result.head, result.config, tmp_path)
    loaded, loaded_config = load_head(
        tmp_path, target_parts(target), target_name="t", target_sha256="ab" * 32
    )
    assert loaded_config == result.config
    assert loaded_config.recipe["train"]["ttt_steps"] == 1
    assert set(loaded.state_dict()) == set(result.head.state_dict())  # no target weights
    assert not any(k.startswith(("embed", "norm", "head")) for k in loaded.state_dict())
    tokens = windows[:2, :8]
    hidden, _ = target_pass(target, tokens, result.config.feature_layers)
    outputs = []
    with torch.no_grad():  # a forward that records gradients needs a cache in the graph
        for head in (result.head, loaded):
            features = head.fuse(hidden)  # [2, 8, D]
            mask = torch.zeros(2, 1, 8, 8).masked_fill(~torch.ones(8, 8).tril().bool(), -1e9)
            positions = torch.arange(1, 9).expand(2, 8)
            out = head(tokens, features, positions, mask, torch.arange(8), head.new_cache(2, 8))
            outputs.append((out, head.logits(out)))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert torch.equal(outputs[0][1], outputs[1][1])
    assert outputs[0][1].dtype == torch.float32 and outputs[0][1].shape == (2, 8, VOCAB)


def test_resume_continues_at_the_same_step_with_the_same_loss(
    target, windows, tmp_path: Path
) -> None:
    config = replace(FAST, checkpoint_every=3, ttt_steps=1)
    whole = train(target, windows, config, target_name="t", out=tmp_path / "whole")

    class Interrupted(Exception):
        pass

    def stop_at_step_4(line: str) -> None:
        if line.startswith("step 4/"):
            raise Interrupted  # after step 3's checkpoint, before step 4's

    with pytest.raises(Interrupted):
        train(
            target, windows, config, target_name="t", out=tmp_path / "cut", progress=stop_at_step_4
        )
    lines: list[str] = []
    resumed = train(
        target,
        windows,
        config,
        target_name="t",
        out=tmp_path / "cut",
        resume=True,
        progress=lines.append,
    )
    assert lines[0].endswith("at step 3")
    assert resumed.step == whole.step == 6
    assert resumed.losses == pytest.approx(whole.losses[3:], rel=1e-5)
    for name, value in whole.head.state_dict().items():
        torch.testing.assert_close(resumed.head.state_dict()[name], value, rtol=1e-5, atol=1e-6)


def test_a_head_for_another_target_is_refused_in_one_line(target, windows, tmp_path) -> None:
    result = train(target, windows, replace(FAST, steps=1), target_name="tiny-a")
    save_head(result.head, result.config, tmp_path)
    for name, sha in (("tiny-b", ""), ("tiny-a", "cd" * 32)):
        if sha:  # same name, other weights: the saved head must know its target's SHA-256
            config = replace(result.config, target_sha256="ab" * 32)
            save_head(result.head, config, tmp_path)
        with pytest.raises(ValueError) as caught:
            load_head(tmp_path, target_parts(target), target_name=name, target_sha256=sha)
        message = str(caught.value)
        assert "\n" not in message and "'tiny-a'" in message and f"'{name}'" in message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("steps", 0),
        ("batch_size", 0),
        ("seq_len", 2),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("weight_decay", -1.0),
        ("loss", "mse"),
        ("ttt_steps", -1),
        ("ttt_decay", 0.0),
        ("feature_layers", ()),
        ("feature_layers", (-1,)),
        ("feature_weight", "big"),
        ("validation", True),
    ],
)
def test_bad_train_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ParamError) as caught:
        TrainConfig(**{field: value})
    assert caught.value.param == field


def test_feature_layers_beyond_the_target_are_refused(target, windows) -> None:
    with pytest.raises(ParamError, match=r"feature_layers") as caught:
        train(target, windows, replace(FAST, feature_layers=(1, 3)), target_name="t")
    assert caught.value.param == "feature_layers"


def test_jsonl_chats_and_windows(tmp_path: Path) -> None:
    path = tmp_path / "chats.jsonl"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    lines = [json.dumps({"text": "def f(): pass"}), "", json.dumps({"messages": messages})]
    path.write_text("\n".join(lines) + "\n")
    assert list(read_jsonl_chats(path)) == ["def f(): pass", messages]
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"messages": "hi"}) + "\n")
    with pytest.raises(DatasetError, match=r"chats\.jsonl:2: each line needs"):
        list(read_jsonl_chats(path))
    packed = token_windows([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4)
    assert packed.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert token_windows(iter([[1] * 10]), 3, max_windows=2).shape == (2, 3)


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few lines, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|end|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(["def add(a, b):\n    return a + b\n"] * 10, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|end|>", chat_template=CHAT_TEMPLATE
    )


def test_train_head_command_end_to_end(tmp_path: Path, capsys) -> None:
    tokenizer = tiny_tokenizer()
    model_dir = save_tiny_lm(tmp_path / "tiny-target", tokenizer, hidden=32, max_positions=128)
    data = tmp_path / "chats.jsonl"
    with data.open("w") as handle:
        for i in range(12):
            chat = [
                {"role": "user", "content": f"add {i} and {i + 1}"},
                {"role": "assistant", "content": f"def add(a, b):\n    return a + b  # {i}"},
            ]
            handle.write(json.dumps({"messages": chat}) + "\n")
    chat_ids = render(tokenizer, chat)
    assert chat_ids[0] == tokenizer.convert_tokens_to_ids("<|user|>")
    out = tmp_path / "head"
    argv = ["train-head", "--target", str(model_dir), "--data", str(data), "--out", str(out)]
    argv += ["--steps", "3", "--batch-size", "2", "--seq-len", "16", "--validation", "2"]
    argv += ["--device", "cpu", "--feature-layers", "1,2", "--ttt-steps", "1"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "step 3/3 loss" in captured.err and "validation at step 3" in captured.err
    assert {p.name for p in out.iterdir()} >= {"head.json", "head.safetensors", "checkpoint.pt"}
    config = read_head_config(out)
    assert config.target == "tiny-target" and config.feature_layers == (1, 2)
    assert config.target_sha256 == weights_sha256(model_dir)
    assert config.recipe["data"] == str(data)
    lm = build(config.arch, dtype=torch.float32, device=torch.device("cpu"), directory=model_dir)
    load_head(out, target_parts(lm), target_name="tiny-target", target_sha256=config.target_sha256)
    # and resumed for two more steps: the checkpoint's step, then on
    assert main([*argv[:-6], "--steps", "5", "--resume", *argv[-6:]]) == 0
    assert "resumed from" in capsys.readouterr().err
