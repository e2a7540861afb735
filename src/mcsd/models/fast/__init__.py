"""mcsd's own compiled runtime for the Llama family (``runtime="fast"``).

- ``arch``     which checkpoints it runs (``config.json`` -> ``Architecture``), refusing others;
- ``model``    the model file: packed QKV and gate-up, slot-written KV cache, the head apart;
- ``runtime``  ``FastModel``, the runtime protocol on the shared slot cache, CUDA graphs and
               ``torch.compile`` per token bucket; ``load_fast`` and ``build``;
- ``parallel`` tensor parallelism on ``torch.distributed``: sharded layers, ``ParallelFastModel``
               (gathered logits, the rank-agreement check), ``launch``.
"""

from mcsd.models.fast.arch import Architecture, architecture, read_architecture
from mcsd.models.fast.runtime import FastModel, build, load_fast

__all__ = ["Architecture", "FastModel", "architecture", "build", "load_fast", "read_architecture"]
