"""mcsd: lossless multi-candidate speculative decoding for Hugging Face causal LMs."""

from mcsd.config import RULES, SamplingConfig, SpecConfig
from mcsd.tree import TokenTree
from mcsd.verify import NodeResult, TreeResult, verify_node, verify_tree

__version__ = "0.1.0"

__all__ = [
    "RULES",
    "NodeResult",
    "SamplingConfig",
    "SpecConfig",
    "TokenTree",
    "TreeResult",
    "__version__",
    "verify_node",
    "verify_tree",
]
