"""A trained draft head: an EAGLE-style autoregressive feature head on the target's hidden states.

The head is one decoder layer of the target's own shapes (``mcsd.models.fast.model.Block``) in
front of the target's frozen final norm and LM head. It reads the target's *features* (hidden
states at ``HeadConfig.feature_layers``, fused into one ``[.., D]`` vector when there are
several, as EAGLE-3 fuses low / mid / high layers) and predicts the next position's feature.

Alignment (one sequence ``x_0 .. x_{T-1}``, target features ``f_0 .. f_{T-1}``, where ``f_t`` is
the target's state at position t, whose logits predict ``x_{t+1}``):

- the head's input at index t is the token ``x_{t+1}`` and the feature ``f_t``; it runs at the
  token's position ``t + 1`` (its rotary position and cache slot);
- its output at index t approximates ``f_{t+1}``, whose logits (``DraftHead.logits``: the
  target's norm and LM head) predict ``x_{t+2}``;
- drafting feeds the head's own output back as the next level's feature: level 1 reads the
  target's ``f_t`` and the token the target just produced, level j + 1 reads level j's output and
  the token drafted from it.

``input = fc(cat(embed(token), feature))``, ``fc: Linear(2D -> D)``; the embedding is the
target's frozen input embedding. Only ``fc``, the fusion layer and the block are the head's
weights; ``save_head`` writes those (safetensors) and ``head.json`` (``HeadConfig``: the target's
name, the SHA-256 of its weights, its architecture, the feature layers and the training recipe);
``load_head`` refuses a head trained for another target.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mcsd.models.fast.arch import Architecture, Rope
from mcsd.models.fast.model import Block, RMSNorm, inverse_frequencies

CONFIG_FILE = "head.json"
WEIGHTS_FILE = "head.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """What a head is and what it was trained for; written to ``head.json``."""

    target: str  # the target model's name (a known name, a directory's name)
    target_sha256: str  # SHA-256 of the target's weights ("" in tests: not checked)
    arch: Architecture  # the target's; the head's decoder layer has its shapes
    # target hidden states read, numbered as transformers' hidden_states: 0 the embeddings, i
    # after layer i, L after the final norm; () means (L,), the last
    feature_layers: tuple[int, ...] = ()
    recipe: Mapping[str, Any] = field(default_factory=dict, hash=False)  # data, steps, lr, ...

    def __post_init__(self) -> None:
        if not isinstance(self.arch, Architecture):
            raise ValueError(f"HeadConfig.arch must be an Architecture, got {self.arch!r}")
        layers = tuple(self.feature_layers) or (self.arch.num_layers,)
        last = self.arch.num_layers
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= last:
                raise ValueError(
                    f"HeadConfig.feature_layers must be integers in [0, {last}], got {layers!r}"
                )
        if len(set(layers)) != len(layers):
            raise ValueError(f"HeadConfig.feature_layers repeats a layer: {layers!r}")
        object.__setattr__(self, "feature_layers", layers)
        try:  # as head.json will hold it: JSON types only (tuples become lists)
            recipe = json.loads(json.dumps(dict(self.recipe)))
        except (TypeError, ValueError) as error:
            raise ValueError(f"HeadConfig.recipe must be JSON data: {error}") from None
        object.__setattr__(self, "recipe", recipe)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "target": self.target,
            "target_sha256": self.target_sha256,
            "arch": dataclasses.asdict(self.arch),
            "feature_layers": list(self.feature_layers),
            "recipe": dict(self.recipe),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> HeadConfig:
        arch = dict(data["arch"])
        arch["rope"] = Rope(**arch["rope"])
        return cls(
            target=str(data["target"]),
            target_sha256=str(data["target_sha256"]),
            arch=Architecture(**arch),
            feature_layers=tuple(int(i) for i in data["feature_layers"]),
            recipe=dict(data.get("recipe", {})),
        )


@dataclass(frozen=True)
class TargetParts:
    """The target's frozen modules the head reads (not the head's weights, never saved)."""

    embed: nn.Embedding  # input embedding [V, D]
    norm: RMSNorm  # final norm
    head: nn.Linear  # LM head [V, D]


class DraftHead(nn.Module):
    """fc over (token embedding, feature) -> one ``Block``; see the module docstring."""

    def __init__(
        self, config: HeadConfig, target: TargetParts, *, max_positions: int | None = None
    ) -> None:
        super().__init__()
        arch = config.arch
        d = arch.hidden_size
        self.config = config
        self.arch = arch
        self.max_positions = max_positions or arch.max_positions
        k = len(config.feature_layers)
        # several layers: one Linear(k * D -> D) fuses them (EAGLE-3); one layer: identity
        self.fusion = nn.Linear(k * d, d, bias=False) if k > 1 else None
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.block = Block(arch)
        self._target = target  # a plain attribute: not registered, not in state_dict()
        self.register_buffer("cos_table", torch.empty(0), persistent=False)
        self.register_buffer("sin_table", torch.empty(0), persistent=False)
        self.init_rope()

    def init_rope(self) -> None:
        """float32 cos/sin tables ``[max_positions, hd]``, built as ``TransformerLM.init_rope``
        builds them, on the head's device."""
        device = self.fc.weight.device
        inv = inverse_frequencies(self.arch.rope, self.arch.head_dim).to(device)
        positions = torch.arange(self.max_positions, device=device).float()
        freqs = positions[:, None] * inv[None, :]  # [positions, hd / 2]
        table = torch.cat([freqs, freqs], dim=-1)  # [positions, hd]
        self.cos_table, self.sin_table = table.cos(), table.sin()

    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Normal linear weights, unit norms, zero biases."""
        generator = torch.Generator(device=self.fc.weight.device).manual_seed(seed)
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                if name.endswith("norm.weight"):
                    parameter.fill_(1.0)
                elif name.endswith("bias"):
                    parameter.zero_()
                else:
                    parameter.normal_(0.0, std, generator=generator)

    @property
    def target(self) -> TargetParts:
        return self._target

    def fuse(self, target_hidden: Tensor) -> Tensor:
        """``[len(feature_layers), B, T, D]`` target hidden states -> features ``[B, T, D]``."""
        if self.fusion is None:
            return target_hidden[0]
        k, b, t, d = target_hidden.shape
        stacked = target_hidden.permute(1, 2, 0, 3).reshape(b, t, k * d)  # [B, T, k * D]
        return self.fusion(stacked)

    def forward(
        self,
        tokens: Tensor,  # [B, n] long, x_{t+1}
        features: Tensor,  # [B, n, D] f_t (fused) or the previous level's output
        positions: Tensor,  # [B, n] long, the tokens' positions
        mask: Tensor,  # [B, 1, n, A] additive, in the head's dtype
        slots: Tensor,  # [n] long, where the new keys/values go
        kv: Tensor,  # [1, 2, B, KV, L, hd] the head's cache
        explicit: bool = False,
    ) -> Tensor:
        """The predicted next features ``[B, n, D]`` (not normed); keys/values in ``kv``.

        Drafting runs under ``torch.inference_mode``; a forward that records gradients needs a
        ``kv`` inside the graph, not a leaf (``mcsd.draft.train.head_loss`` makes one)."""
        x = torch.cat([self._target.embed(tokens), features], dim=-1)  # [B, n, 2D]
        x = self.fc(x)  # [B, n, D]
        cos = self.cos_table[positions].to(x.dtype)[:, None]  # [B, 1, n, hd]
        sin = self.sin_table[positions].to(x.dtype)[:, None]
        b, _, n, length = mask.shape
        groups = self.arch.num_heads // self.arch.num_kv_heads
        grouped = mask[:, :, None].expand(b, 1, groups, n, length).reshape(b, 1, groups * n, length)
        return self.block(x, cos, sin, grouped, slots, kv[0, 0], kv[0, 1], explicit)

    def logits(self, hidden: Tensor) -> Tensor:
        """``[.., D]`` head output -> float32 ``[.., V]`` through the target's norm and head."""
        return self._target.head(self._target.norm(hidden)).float()

    def new_cache(self, batch: int, length: int, dtype: torch.dtype | None = None) -> Tensor:
        """An empty cache ``[1, 2, B, KV, L, hd]`` on the head's device, in ``dtype`` (default
        the head's; the compute dtype under autocast)."""
        arch, weight = self.arch, self.fc.weight
        shape = (1, 2, batch, arch.num_kv_heads, length, arch.head_dim)
        return torch.zeros(shape, dtype=dtype or weight.dtype, device=weight.device)


def weights_sha256(directory: str | Path) -> str:
    """SHA-256 over a checkpoint's safetensors files (sorted by name, each name then its
    bytes): the identity ``HeadConfig.target_sha256`` records."""
    import hashlib

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors weights in {directory}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def target_parts(lm: Any) -> TargetParts:
    """The frozen parts of a ``TransformerLM`` (or a ``FastModel``'s ``lm``) the head reads."""
    lm = getattr(lm, "lm", lm)
    return TargetParts(embed=lm.embed, norm=lm.norm, head=lm.head)


def save_head(
    head: DraftHead, config: HeadConfig, directory: str | Path, *, dtype: torch.dtype | None = None
) -> Path:
    """Write the head's own weights (``head.safetensors``, in ``dtype``: default the head's) and
    ``head.json``; returns the directory."""
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    state = {
        name: t.detach().to(dtype or t.dtype).contiguous().cpu()
        for name, t in head.state_dict().items()
    }
    save_file(state, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")
    return path


def read_head_config(directory: str | Path) -> HeadConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the head config {path}: {error}") from None
    try:
        return HeadConfig.from_json(data)
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a head config: {error}") from None


def load_head(
    directory: str | Path,
    target: TargetParts,
    *,
    target_name: str,
    target_sha256: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    max_positions: int | None = None,
) -> tuple[DraftHead, HeadConfig]:
    """The head saved in ``directory`` on the target whose frozen ``target`` parts it reads.

    A head trained for another target is refused with one ``ValueError`` naming both: the names
    differ, or both SHA-256 are known and differ."""
    from safetensors.torch import load_file

    config = read_head_config(directory)
    same_name = config.target == target_name
    same_weights = not (config.target_sha256 and target_sha256) or (
        config.target_sha256 == target_sha256
    )
    if not (same_name and same_weights):
        raise ValueError(
            f"the head in {directory} was trained for target {config.target!r} "
            f"(sha256 {config.target_sha256[:12] or '?'}), not for {target_name!r} "
            f"(sha256 {target_sha256[:12] or '?'})"
        )
    weight = target.embed.weight
    device = torch.device(device) if device is not None else weight.device
    head = DraftHead(config, target, max_positions=max_positions)
    state = load_file(str(Path(directory) / WEIGHTS_FILE))
    head.load_state_dict(state, strict=True)
    head = head.to(device=device, dtype=dtype or weight.dtype)
    head.init_rope()
    return head.eval(), config
