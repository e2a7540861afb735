"""Runtimes: every model mcsd runs, behind one protocol (``base.Runtime``).

``base`` declares the runtime protocol; ``factory`` picks and loads a runtime (``RUNTIMES``:
``hf``, ``hf-static``, ``fast``, ``llama.cpp``); ``hf``, ``static`` (with ``slots``), ``fast/``,
``llamacpp`` (with ``sequences``) and ``toy`` implement it; ``cheap`` and ``frequent`` make
cheaper drafts; ``hf_baselines`` and ``llamacpp_baselines`` are the libraries' own loops that
``mcsd bench`` compares against. Nothing here imports ``mcsd.bench``.
"""
