#!/usr/bin/env bash
# The real-pair CPU benchmark recorded in docs/benchmarks.md ("mcsd bench on the CPU with the real
# pair"): Qwen2.5-Coder 1.5B (target) <- 0.5B (draft), bf16, 128 new tokens, one torch thread per
# run, seed 0. The two runs were started together, one per core of the 2-core machine (about 70
# and 60 minutes).
set -euo pipefail
OUT=${OUT:-bench-out}
export OMP_NUM_THREADS=1
# Found by `mcsd bench --sweep --threads 1 --n 3 --max-new-tokens 128` for this pair on this CPU.
TOP8='tree:[[0],[1],[0,0],[0,1],[0,0,0],[0,0,0,0],[0,0,0,0,0],[0,0,0,0,0,0]]'

# Greedy, 10 HumanEval + 10 MT-bench prompts: the baselines, a bf16 chain, the int8-draft winners.
mcsd bench --threads 1 --n 10 --max-new-tokens 128 --seed 0 --out "$OUT/greedy" \
  --methods hf-ar hf-assisted hf-assisted:5 sps:4 sps:5+int8 "$TOP8+int8" sps:5+int8+fr=32768 &

# Temperature 1, 5 + 5 prompts: chain vs trees of the same depth, every rule on one tree.
mcsd bench --threads 1 --n 5 --max-new-tokens 128 --seed 0 --temperature 1 --out "$OUT/sampling" \
  --methods hf-assisted hf-assisted:5 sps:3 tree:4,2,2:mcss-wor tree:4,2,2:optimal \
  tree:4,2,2:kseq tree:4,2,2:traversal sps:4+int8 tree:2,2,1,1+int8 &
wait
