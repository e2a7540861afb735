"""Which checkpoints the fast runtime runs: the Llama family, read from a ``config.json``.

Supported (``FAMILIES``): Llama 2 / 3 / 3.1+ (rope scaling ``llama3`` or ``linear``), Qwen2 /
Qwen2.5 (QKV bias, tied embeddings in the small sizes), Qwen3 (per-head q/k RMSNorm, explicit
head_dim) and Mistral without a sliding window. Everything the model file needs is one frozen
``Architecture``; anything else is refused with one ``ValueError`` saying what is supported (the
``hf`` runtime keeps serving it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")  # config.json model_type values
ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED = (
    "Llama 2/3/3.1+ (rope default, linear or llama3), Qwen2/2.5, Qwen3, Mistral without a "
    "sliding window"
)


@dataclass(frozen=True)
class Rope:
    theta: float
    kind: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@dataclass(frozen=True)
class Architecture:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope: Rope
    qkv_bias: bool  # Qwen2 always; Llama / Qwen3 when attention_bias
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before rope
    tied_embeddings: bool
    max_positions: int

    @property
    def qkv_size(self) -> int:
        """Rows of the packed QKV projection: q heads, then k heads, then v heads."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def parameters(self) -> int:
        """Weights a forward reads (no input embedding when it is not the head)."""
        d, hd = self.hidden_size, self.head_dim
        attention = d * self.qkv_size + self.num_heads * hd * d
        mlp = 3 * d * self.intermediate_size
        return self.num_layers * (attention + mlp) + self.vocab_size * d


def _refuse(model_type: str, why: str) -> ValueError:
    return ValueError(
        f"the fast runtime does not run this checkpoint ({model_type}: {why}); it supports "
        f"{SUPPORTED}; use runtime 'hf' for it"
    )


def architecture(config: dict[str, Any]) -> Architecture:
    """The ``Architecture`` of a ``config.json`` dictionary, or a ``ValueError`` naming what is
    not supported."""
    model_type = str(config.get("model_type", "?"))
    if model_type not in FAMILIES:
        raise _refuse(model_type, "not a Llama-family model type")
    if config.get("hidden_act", "silu") != "silu":
        raise _refuse(model_type, f"activation {config.get('hidden_act')!r}, not silu")
    if config.get("mlp_bias"):
        raise _refuse(model_type, "MLP biases")
    layer_types = config.get("layer_types") or ["full_attention"]
    sliding = config.get("sliding_window") if model_type == "mistral" else None
    if config.get("use_sliding_window") or sliding or set(layer_types) != {"full_attention"}:
        raise _refuse(model_type, "sliding-window attention layers")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    rope = _rope(model_type, config)
    return Architecture(
        family=model_type,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate_size=int(config["intermediate_size"]),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope=rope,
        qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
        qk_norm=model_type == "qwen3",
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_positions=int(config.get("max_position_embeddings", 4096)),
    )


def _rope(model_type: str, config: dict[str, Any]) -> Rope:
    """Rope settings from either config.json spelling: ``rope_parameters`` (transformers 5.x)
    or ``rope_theta`` + ``rope_scaling`` (earlier checkpoints)."""
    parameters = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    merged = {**scaling, **parameters}
    theta = float(merged.get("rope_theta", config.get("rope_theta", 10000.0)))
    kind = str(merged.get("rope_type", merged.get("type", "default")))
    if kind not in ROPE_TYPES:
        raise _refuse(model_type, f"rope type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return Rope(theta)
    factor = float(merged.get("factor", 1.0))
    if kind == "linear":
        return Rope(theta, kind, factor)
    return Rope(
        theta,
        kind,
        factor,
        float(merged.get("low_freq_factor", 1.0)),
        float(merged.get("high_freq_factor", 4.0)),
        int(merged.get("original_max_position_embeddings", 8192)),
    )


def read_architecture(directory: str | Path) -> Architecture:
    """``architecture`` of ``directory/config.json``."""
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the model config {path}: {error}") from None
    return architecture(config)
