"""``mcsd bench`` end to end on two tiny random models saved to disk (built here, no download):
every kind of method, the table, the answer files, summary.json and the PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import save_tiny_lm

from mcsd.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained on a few lines, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|end|>", "<|user|>", "<|assistant|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["def add(a, b):\n    return a + b\n", "Write a short story about a cat."] * 20
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|end|>", chat_template=CHAT_TEMPLATE
    )


def tiny_model(directory: Path, tokenizer, seed: int, layers: int) -> Path:
    return save_tiny_lm(
        directory,
        tokenizer,
        seed=seed,
        layers=layers,
        hidden=32,
        max_positions=512,
        sharpen=None,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = tiny_tokenizer()
    target = tiny_model(root / "target", tokenizer, seed=0, layers=2)
    draft = tiny_model(root / "draft", tokenizer, seed=1, layers=1)
    prompts = root / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"question_id": 1, "turns": ["def add(a, b):", "Now in one line."]})
        + "\n"
        + json.dumps({"prompt": "Write a short story about a cat."})
        + "\n"
    )
    return target, draft, prompts


def test_bench_greedy_end_to_end(tiny_pair, tmp_path: Path, capsys, monkeypatch) -> None:
    target, draft, prompts = tiny_pair
    out = tmp_path / "out"
    monkeypatch.setenv("MCSD_CACHE", str(tmp_path / "cache"))  # the +fr token ranking goes there
    monkeypatch.setattr("mcsd.models.frequent.CORPUS_CHARS", 20_000)
    methods = ["hf-ar", "hf-assisted:3", "ar", "sps:2", "tree:2,2", "tree:2,1+fr=100", "sps:2+int8"]
    methods += ["mixed:2,1", "mixed:2,1+int8"]  # the draft's tree and the context's in one
    models = ["--target", str(target), "--draft", str(draft), "--dtype", "float32"]
    run = ["--dataset", str(prompts), "--turns", "2", "--max-new-tokens", "8", "--temperature", "0"]
    quiet = ["--warmup-tokens", "2", "--no-progress", "--out", str(out)]
    code = main(["bench", *models, *run, *quiet, "--methods", *methods])
    assert code == 0
    printed = capsys.readouterr().out
    assert "tree:2,2" in printed and "x hf-ar" in printed
    for name in ("speedup.png", "al_vs_tree_size.png", "acceptance_per_depth.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["versions"]["transformers"] and summary["dtype"] == "float32"
    pooled = summary["results"]["all"]
    for name in methods:  # fp32 greedy: everyone reproduces the target's own output
        assert pooled[name]["equal_rate"] == 1.0, name
        assert pooled[name]["turns"] == 3  # two turns of the first question, one of the second
    assert pooled["tree:2,2"]["tree_size"] == 6
    assert list((tmp_path / "cache" / "vocab").glob("*.pt"))
    assert pooled["ar"]["mean_accepted_length"] == 1.0
    lines = (out / "answers" / "tree-2.2.jsonl").read_text().splitlines()
    first = json.loads(lines[0])["choices"][0]
    assert len(first["turns"]) == 2 and sum(first["new_tokens"]) == sum(first["accept_lengths"])
    assert (out / "table.txt").read_text().count("tree:2,2") == 2  # prompts + all
    assert "ctx %" in printed and pooled["mixed:2,1"]["mean_tree_size"] >= 3


def test_bench_without_a_draft_model(tiny_pair, tmp_path: Path, capsys) -> None:
    """Context drafting and transformers' prompt lookup need no draft: none is loaded (the
    --draft path does not exist)."""
    target, _, prompts = tiny_pair
    out = tmp_path / "out"
    methods = ["hf-ar", "hf-pld", "hf-pld:3", "ar", "ctx", "ctx:4"]
    models = ["--target", str(target), "--draft", str(tmp_path / "missing"), "--dtype", "float32"]
    run = ["--dataset", str(prompts), "--max-new-tokens", "12", "--temperature", "0"]
    quiet = ["--warmup-tokens", "2", "--no-progress", "--no-plots", "--out", str(out)]
    assert main(["bench", *models, *run, *quiet, "--methods", *methods]) == 0
    assert "no draft" in capsys.readouterr().err
    pooled = json.loads((out / "summary.json").read_text())["results"]["all"]
    for name in methods:
        assert pooled[name]["equal_rate"] == 1.0, name
    assert pooled["ctx:4"]["tree_size"] <= 4
    assert pooled["hf-pld:3"]["steps"] <= pooled["hf-ar"]["steps"]


def test_generate_with_the_context_proposer_loads_no_draft(tiny_pair, tmp_path: Path, capsys):
    target, _, _ = tiny_pair
    models = ["--target", str(target), "--draft", str(tmp_path / "missing"), "--dtype", "float32"]
    run = ["--temperature", "0", "--max-new-tokens", "8", "--proposer", "context", "--json"]
    assert main(["generate", "def add(a, b): return a + b\ndef add(", *models, *run]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["token_ids"]) == 8 and "context_share" in result["stats"]


def test_bench_sampling_runs(tiny_pair, tmp_path: Path) -> None:
    target, draft, prompts = tiny_pair
    out = tmp_path / "out"
    models = ["--target", str(target), "--draft", str(draft), "--dtype", "float32"]
    run = ["--dataset", str(prompts), "--n", "1", "--max-new-tokens", "6", "--temperature", "1"]
    methods = ["hf-ar", "hf-assisted", "sps:2", "tree:2,1:mcss"]
    quiet = ["--warmup-tokens", "0", "--no-progress", "--no-plots", "--out", str(out)]
    code = main(["bench", *models, *run, *quiet, "--methods", *methods])
    assert code == 0
    pooled = json.loads((out / "summary.json").read_text())["results"]["all"]
    assert pooled["tree:2,1:mcss"]["equal_rate"] is None  # only compared in greedy runs
    assert pooled["sps:2"]["new_tokens"] > 0


def test_bench_static_cache_and_hf_static(tiny_pair, tmp_path: Path, capsys) -> None:
    """The GPU fast path's options on the CPU: mcsd methods on the static cache and transformers'
    own static-cache decoding (hf-static) reproduce the target's fp32 greedy output."""
    target, draft, prompts = tiny_pair
    out = tmp_path / "out"
    models = ["--target", str(target), "--draft", str(draft), "--dtype", "float32"]
    run = ["--dataset", str(prompts), "--n", "1", "--max-new-tokens", "8", "--static-cache"]
    run += ["--temperature", "0"]
    methods = ["hf-static", "ar", "sps:2", "tree:2,2"]
    quiet = ["--warmup-tokens", "2", "--no-progress", "--no-plots", "--out", str(out)]
    code = main(["bench", *models, *run, *quiet, "--methods", *methods])
    assert code == 0
    printed = capsys.readouterr().out
    assert "x hf-static" in printed and "= hf-static" in printed
    pooled = json.loads((out / "summary.json").read_text())["results"]["all"]
    for name in methods:
        assert pooled[name]["equal_rate"] == 1.0, name
        assert pooled[name]["new_tokens"] == 8, name
    assert pooled["hf-static"]["speedup_vs_hf-static"] == 1.0
    assert pooled["hf-static"]["mean_accepted_length"] == 1.0


def test_bench_cheap_drafts_on_the_static_cache(tiny_pair, tmp_path: Path, monkeypatch) -> None:
    """+int8 / +fr drafts keep the pair's runtime (here the static cache), still lossless."""
    target, draft, prompts = tiny_pair
    monkeypatch.setenv("MCSD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("mcsd.models.frequent.CORPUS_CHARS", 20_000)
    out = tmp_path / "out"
    models = ["--target", str(target), "--draft", str(draft), "--dtype", "float32"]
    run = ["--dataset", str(prompts), "--n", "1", "--max-new-tokens", "8", "--static-cache"]
    run += ["--temperature", "0"]
    methods = ["ar", "sps:2+int8", "tree:2,1+fr=100"]
    quiet = ["--warmup-tokens", "2", "--no-progress", "--no-plots", "--out", str(out)]
    assert main(["bench", *models, *run, *quiet, "--methods", *methods]) == 0
    pooled = json.loads((out / "summary.json").read_text())["results"]["all"]
    for name in methods:
        assert pooled[name]["equal_rate"] == 1.0, name


def test_bench_compile_needs_static_cache(tmp_path: Path, capsys) -> None:
    code = main(["bench", "--compile", "draft", "--methods", "ar", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "--compile draft needs --runtime hf-static" in err and "Traceback" not in err


def test_bench_rejects_bad_method_before_loading(tmp_path: Path, capsys) -> None:
    argv = ["bench", "--methods", "tree:2,2:mcss", "--temperature", "0", "--out", str(tmp_path)]
    code = main(argv)  # greedy + mcss
    assert code == 2
    assert "needs a sampling target" in capsys.readouterr().err


def test_tune_saves_the_fastest_tree(tiny_pair, tmp_path: Path, monkeypatch, capsys) -> None:
    target, draft, prompts = tiny_pair
    monkeypatch.setenv("MCSD_CACHE", str(tmp_path / "cache"))
    models = ["--target", str(target), "--draft", str(draft), "--dtype", "float32"]
    run = ["--dataset", str(prompts), "--n", "2", "--max-new-tokens", "8", "--budgets", "2,4"]
    quiet = ["--warmup-tokens", "0", "--no-progress", "--verify", "1", "--out", str(tmp_path)]
    assert main(["tune", *models, *run, *quiet]) == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert set(sweep["best_per_budget"]) == {"2", "4"}
    assert all(c["nodes"] <= 4 for c in sweep["candidates"])
    assert "ar" in sweep["measured"]
    tuned = json.loads((tmp_path / "cache" / "tuned.json").read_text())
    ((key, entry),) = tuned.items()
    assert key == f"{target}|{draft}|cpu|float32|hf"
    assert entry["source"] == "measured" and entry["tree"]
    # generate uses it when --tree is not given, and says so first
    capsys.readouterr()
    code = main(["generate", "def f(x):", *models, "--max-new-tokens", "4", "--temperature", "0"])
    assert code == 0
    assert f"tree {entry['tree']} saved by mcsd tune" in capsys.readouterr().err.splitlines()[0]


def test_bench_batch_size(tiny_pair, tmp_path: Path, capsys) -> None:
    """``--batch-size 2``: ar, a chain and a tree over 2 rows side by side (3 prompts: one row
    joins late); greedy, so every method's answers equal ar's."""
    target, draft, prompts = tiny_pair
    three = tmp_path / "three.jsonl"
    lines = prompts.read_text().splitlines()
    three.write_text("\n".join([*lines, json.dumps({"prompt": "def mul(a, b):"})]) + "\n")
    out = tmp_path / "out"
    models = ["--target", str(target), "--draft", str(draft), "--dtype", "float32"]
    run = ["--dataset", str(three), "--max-new-tokens", "8", "--temperature", "0"]
    batch = ["--out", str(out), "--batch-size", "2", "--methods", "ar", "sps:2", "tree:2,2"]
    code = main(["bench", *models, *run, *batch])
    assert code == 0
    rows = json.loads((out / "batch-2.json").read_text())
    assert [r["method"] for r in rows] == ["ar", "sps:2", "tree:2,2"]
    assert all(r["matches_ar"] is True and r["tokens"] == 24 for r in rows)
    assert rows[0]["mean_accepted_length"] == 1.0 and rows[2]["tokens_per_second"] > 0
    assert "tree:2,2" in capsys.readouterr().out


def test_bench_several_batch_sizes(tiny_pair, tmp_path: Path, capsys) -> None:
    """``--batch-size 1,2``: both sizes on one model load, a file and a table per size, and the
    same greedy answers at every size."""
    target, draft, prompts = tiny_pair
    out = tmp_path / "out"
    models = ["--target", str(target), "--draft", str(draft), "--dtype", "float32"]
    run = ["--dataset", str(prompts), "--max-new-tokens", "6", "--temperature", "0"]
    argv = ["bench", *models, *run, "--out", str(out), "--batch-size", "1,2"]
    assert main([*argv, "--methods", "ar", "tree:2,1"]) == 0
    one, two = (json.loads((out / f"batch-{b}.json").read_text()) for b in (1, 2))
    assert [r["batch_size"] for r in one + two] == [1, 1, 2, 2]
    assert all(r["matches_ar"] is True for r in one + two)
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    assert capsys.readouterr().out.count("tree:2,1") == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
        (["--batch-size", "1,x"], "--batch-size must be an integer >= 1 or a comma-separated"),
        (["--batch-size", "2,2"], "--batch-size names a size twice"),
        (["--batch-size", "2", "--methods", "hf-ar", "ar"], "drop hf-ar"),
    ],
)
def test_bench_batch_size_refuses_bad_options(tmp_path: Path, capsys, argv, message) -> None:
    code = main(["bench", "--target", "no-such-model", "--out", str(tmp_path), *argv])
    assert code != 0
    assert message in capsys.readouterr().err


def test_generate_adaptive_tree(tiny_pair, capsys) -> None:
    """``--adaptive-tree``: said on the first line, the probe logged once, the target's own
    greedy output, the plain steps counted."""
    target, draft, _ = tiny_pair
    models = ["--target", str(target), "--draft", str(draft), "--dtype", "float32"]
    run = ["def f(x):", *models, "--max-new-tokens", "12", "--temperature", "0", "--json"]
    assert main(["generate", *run, "--tree", "2,1", "--adaptive-tree"]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    assert err[0] == "mcsd: adaptive tree (--adaptive-tree)"
    assert sum("adaptive tree: measured step cost: target" in line for line in err) == 1
    adaptive = json.loads(captured.out)
    stats = adaptive["stats"]
    speculative = stats["steps"] - stats["plain_steps"]
    nodes = round(stats["mean_tree_size"] * stats["steps"])
    # a plain step verifies no node and commits one token; any other verifies 1 to 4 (2,1) nodes
    assert 0 <= stats["plain_steps"] <= stats["accept_lengths"].count(1)
    assert speculative <= nodes <= 4 * speculative
    assert main(["generate", *run, "--tree", "none"]) == 0
    assert adaptive["token_ids"] == json.loads(capsys.readouterr().out)["token_ids"]
    assert main(["generate", *run, "--tree", "2,1", "--no-adaptive-tree"]) == 0
    assert "adaptive" not in capsys.readouterr().err


def test_bench_adaptive_methods(tiny_pair, tmp_path: Path, capsys) -> None:
    """``+adaptive`` on a method, ``--adaptive-tree`` on every static sps / tree method: greedy
    output still the target's, the plain-step share in the table."""
    target, draft, prompts = tiny_pair
    out = tmp_path / "out"
    models = ["--target", str(target), "--draft", str(draft), "--dtype", "float32"]
    run = ["--dataset", str(prompts), "--max-new-tokens", "8", "--temperature", "0"]
    quiet = ["--warmup-tokens", "2", "--no-progress", "--no-plots", "--out", str(out)]
    methods = ["--methods", "ar", "sps:2", "tree:2,1+adaptive"]
    assert main(["bench", *models, *run, *quiet, *methods, "--adaptive-tree"]) == 0
    captured = capsys.readouterr()
    assert "plain %" in captured.out
    assert "mcsd: tree:2,1+adaptive: measured step cost" in captured.err
    pooled = json.loads((out / "summary.json").read_text())["results"]["all"]
    assert set(pooled) == {"ar", "sps:2+adaptive", "tree:2,1+adaptive"}
    for row in pooled.values():
        assert row["equal_rate"] == 1.0 and 0 <= row["plain_steps"] <= row["steps"]
    batch = ["--out", str(out), "--batch-size", "2", *methods]
    assert main(["bench", *models, *run, *batch]) == 0
    rows = json.loads((out / "batch-2.json").read_text())
    assert [r["matches_ar"] for r in rows] == [True] * 3 and rows[2]["steps"] > 0
    assert "plain" in capsys.readouterr().out


def test_bench_adaptive_tree_flag_merges_listed_twins() -> None:
    from mcsd.cli import build_parser
    from mcsd.commands.bench import parse_methods

    methods = ["ar", "tree:2,1", "tree:2,1+adaptive", "sps:2", "dynamic:8", "ctx"]
    argv = ["bench", "--target", "no-such-model", "--methods", *methods, "--adaptive-tree"]
    names = [m.name for m in parse_methods(build_parser().parse_args(argv))]
    assert names == ["ar", "tree:2,1+adaptive", "sps:2+adaptive", "dynamic:8", "ctx"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "x", "--tree", "none", "--adaptive-tree"], "--adaptive-tree picks among"),
        (["generate", "x", "--proposer", "context", "--adaptive-tree"], "--proposer context"),
        (["generate", "x", "--tree", "dynamic:8", "--adaptive-tree"], "static draft tree"),
        (["bench", "--methods", "ar", "dynamic:8+adaptive"], "+adaptive goes on sps:G"),
        (["bench", "--methods", "ctx+adaptive"], "+adaptive goes on sps:G"),
        (["bench", "--methods", "sps:2+adaptive=1"], "+adaptive goes on sps:G"),
    ],
)
def test_adaptive_tree_refuses_what_it_cannot_shrink(capsys, argv, message) -> None:
    """Before any model loads (the target does not exist)."""
    code = main([*argv, "--target", "no-such-model"])
    assert code != 0
    assert message in capsys.readouterr().err


def test_adaptive_tree_default_per_runtime(monkeypatch) -> None:
    """On by default where ``RUNTIME_ADAPTIVE_TREE`` says so (llama.cpp), for static trees
    drafted by the model; off elsewhere, and whenever --no-adaptive-tree says so."""
    import argparse

    from mcsd.commands import options
    from mcsd.config import SpecConfig

    def args(asked: bool | None) -> argparse.Namespace:
        return argparse.Namespace(adaptive_tree=asked, tp=1)

    monkeypatch.setattr(options, "_runtime_name", lambda _: "llama.cpp")
    on, said = options.adaptive_from_args(args(None), SpecConfig(tree="1,1,1"))
    assert on and said is not None and "the default on llama.cpp" in said
    assert options.adaptive_from_args(args(False), SpecConfig(tree="1,1,1")) == (False, None)
    assert options.adaptive_from_args(args(None), SpecConfig(tree="none")) == (False, None)
    assert options.adaptive_from_args(args(None), SpecConfig(tree="dynamic:8"))[0] is False
    monkeypatch.setattr(options, "_runtime_name", lambda _: "hf")
    assert options.adaptive_from_args(args(None), SpecConfig(tree="1,1,1")) == (False, None)
