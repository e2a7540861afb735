"""mcsd: lossless multi-candidate speculative decoding for Hugging Face causal LMs."""

from importlib import metadata

from mcsd.api import GenerationResult, ModelPair, generate, load_model, load_pair, stream
from mcsd.config import SamplingConfig, SpecConfig
from mcsd.stats import Stats
from mcsd.tree import TokenTree
from mcsd.verify import RULE_NAMES, RULES, NodeResult, TreeResult, verify_node, verify_tree

try:
    __version__ = metadata.version("mcsd")
except metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "RULES",
    "RULE_NAMES",
    "GenerationResult",
    "ModelPair",
    "NodeResult",
    "SamplingConfig",
    "SpecConfig",
    "Stats",
    "TokenTree",
    "TreeResult",
    "__version__",
    "generate",
    "load_model",
    "load_pair",
    "stream",
    "verify_node",
    "verify_tree",
]
