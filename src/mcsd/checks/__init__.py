"""The losslessness toolkit (what ``mcsd check`` and the tests run).

- ``node``     one tree node: exact enumeration of a rule's outcome and Monte Carlo with
               goodness-of-fit tests (chi-square, total variation) against the target;
- ``engine``   the whole engine with table-driven toy LMs whose sequence distribution is known;
- ``compare``  per-node acceptance of the rules against the bound alpha*;
- ``capture``  real (p, q) pairs captured from a model pair, for ``compare`` and the tests;
- ``tiny_gguf`` tiny GGUF models, to run the checks through llama.cpp;
- ``defaults`` the defaults of ``mcsd check`` and ``capture``.
"""
