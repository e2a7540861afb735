#!/usr/bin/env bash
# The CPU benchmark of issue 13 (record the results in docs/benchmarks.md): the real pair as GGUF
# Q4_K_M on the llama.cpp runtime, 10 HumanEval + 10 MT-bench prompts, 128 new tokens, greedy
# and temperature 1, every method interleaved prompt by prompt, THREADS threads; then the
# transformers rows for reference and the decode cost table for N = 1 .. 32.
#
# Rows on the llama.cpp runtime:
#   llama-ar              the target alone through llama.cpp's own loop and sampler
#   llama-spec            llama.cpp's draft-model speculative decoding ("draft-simple", its
#                         defaults: up to 3 draft tokens, no confidence cut), re-implemented
#                         through the same bindings (mcsd.models.llamacpp_baselines)
#   llama-spec:16:0.75    the same with llama-server's best setting measured in issue 13
#   ar                    mcsd's target alone through the runtime protocol
#   sps:G, tree:K         mcsd on this runtime
# Optional (LLAMA_BINARY=1): llama.cpp's own llama-speculative-simple binary, built from the
# vendored source of the installed llama-cpp-python, on the same prompts, as a cross-check of
# the llama-spec row (its own timing lines; about 5 minutes to build once).
#
# Run on a quiet machine, one benchmark at a time (each uses THREADS cores):
#   bash bench/cpu_llamacpp.sh                 # the whole thing (about 2 hours on 2 cores)
#   TINY=1 bash bench/cpu_llamacpp.sh          # 1 prompt per set, 8 tokens: checks it runs
set -euo pipefail
OUT=${OUT:-bench-out/cpu-llamacpp}
THREADS=${THREADS:-2}
N=${N:-10}
TOKENS=${TOKENS:-128}
SIZES=${SIZES:-$(seq -s, 1 32)}
if [ "${TINY:-0}" = 1 ]; then N=1 TOKENS=8 SIZES=1,2,4; fi
export OMP_NUM_THREADS=$THREADS
common=(--threads "$THREADS" --n "$N" --max-new-tokens "$TOKENS" --seed 0 --no-progress)

# 1. Greedy on llama.cpp: the baselines, chains, small trees and the default tree.
mcsd bench --runtime llama.cpp "${common[@]}" --temperature 0 --out "$OUT/greedy" \
  --methods llama-ar llama-spec llama-spec:16:0.75 ar sps:2 sps:3 sps:4 \
  tree:2,1 tree:2,1,1 tree:3,1,1 tree:2,2,1 tree:4,2,2

# 2. Temperature 1 on llama.cpp (mcss-wor: the lossless rule for sampled trees).
mcsd bench --runtime llama.cpp "${common[@]}" --temperature 1 --out "$OUT/sampling" \
  --methods llama-ar llama-spec llama-spec:16:0.75 ar sps:2 sps:3 \
  tree:2,1,1:mcss-wor tree:2,2:mcss-wor tree:4,2,2:mcss-wor

# 3. The transformers runtime for reference (bf16 on this CPU), same prompts.
mcsd bench --runtime hf "${common[@]}" --temperature 0 --out "$OUT/transformers-greedy" \
  --methods hf-ar hf-assisted:5 ar sps:4 tree:4,2,2

# 4. Decode cost of N new tokens (chain and widest tree) for both models on llama.cpp.
python bench/llamacpp_decode_cost.py --threads "$THREADS" --sizes "$SIZES" \
  --out "$OUT/decode_cost.json" | tee "$OUT/decode_cost.txt"

# 5. Optional: llama.cpp's own llama-speculative-simple on the first prompts of run 1.
if [ "${LLAMA_BINARY:-0}" = 1 ]; then
  bash bench/llamacpp_binary_spec.sh "$OUT/greedy" "$THREADS" "$TOKENS" | tee "$OUT/binary_spec.txt"
fi
