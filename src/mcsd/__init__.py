"""mcsd: lossless multi-candidate speculative decoding for Hugging Face causal LMs."""

from mcsd.api import GenerationResult, ModelPair, generate, load_model, load_pair, stream
from mcsd.config import RULES, SamplingConfig, SpecConfig
from mcsd.stats import Stats
from mcsd.tree import TokenTree
from mcsd.verify import NodeResult, TreeResult, verify_node, verify_tree

__version__ = "0.1.0"

__all__ = [
    "RULES",
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
