#!/usr/bin/env bash
# llama.cpp's own speculative decoding binary (examples/speculative-simple, --spec-type
# draft-simple), built from the llama.cpp vendored in the installed llama-cpp-python's sdist
# with the same flags as .ci/build-llamacpp, run on the first prompts of HumanEval and MT-bench
# (chat template applied, as mcsd bench does) with the real pair: a cross-check of the
# llama-spec row of bench/cpu_llamacpp.sh. Prints llama.cpp's own timing and acceptance lines.
#
#   bash bench/llamacpp_binary_spec.sh OUT_DIR [THREADS] [TOKENS]
set -euo pipefail
OUT=${1:-bench-out/cpu-llamacpp}
THREADS=${2:-2}
TOKENS=${3:-128}
N=${N:-3}
version=$(python -c "import llama_cpp; print(llama_cpp.__version__)")
build=${LLAMA_BUILD_DIR:-${MCSD_CACHE:-$HOME/.cache/mcsd}/build/llama.cpp-$version}
binary=$build/bin/llama-speculative-simple
amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if [ ! -x "$binary" ]; then
  mkdir -p "$build/src"
  python -m pip download -q --no-deps --no-binary :all: -d "$build/src" "llama-cpp-python==$version"
  tar -xzf "$build/src/llama_cpp_python-$version.tar.gz" -C "$build/src"
  source="$build/src/llama_cpp_python-$version/vendor/llama.cpp"
  cmake -S "$source" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DCMAKE_C_FLAGS="$amx" -DCMAKE_CXX_FLAGS="$amx" >/dev/null
  cmake --build "$build" --target llama-speculative-simple -j "$(nproc)" >/dev/null
fi
mkdir -p "$OUT/binary-prompts"
python - "$OUT/binary-prompts" "$N" <<'PY'
import sys
from pathlib import Path

from mcsd.bench.datasets import load_dataset
from mcsd.models.llamacpp import GGUFTokenizer
from mcsd.sources import DEFAULT_TARGET, resolve_gguf

out, n = Path(sys.argv[1]), int(sys.argv[2])
tokenizer = GGUFTokenizer.from_file(resolve_gguf(DEFAULT_TARGET, progress=False))
for name in ("humaneval", "mt-bench"):
    for question in load_dataset(name, n=n, seed=0, turns=1):
        messages = [{"role": "user", "content": question.turns[0]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        stem = "".join(c if c.isalnum() else "-" for c in f"{name}-{question.question_id}")
        (out / f"{stem}.txt").write_text(text)
PY
target=$(python -c "from mcsd.sources import resolve_gguf, DEFAULT_TARGET; print(resolve_gguf(DEFAULT_TARGET))")
draft=$(python -c "from mcsd.sources import resolve_gguf, DEFAULT_DRAFT; print(resolve_gguf(DEFAULT_DRAFT))")
for settings in "3 0.0" "16 0.75"; do
  read -r n_max p_min <<<"$settings"
  for prompt in "$OUT"/binary-prompts/*.txt; do
    echo "== $(basename "$prompt" .txt) --spec-draft-n-max $n_max --spec-draft-p-min $p_min"
    "$binary" -m "$target" -md "$draft" -f "$prompt" -n "$TOKENS" -t "$THREADS" -td "$THREADS" \
      --spec-type draft-simple --spec-draft-n-max "$n_max" --spec-draft-p-min "$p_min" \
      --temp 0 --top-k 1 --seed 0 -c 4096 2>&1 \
      | grep -E "(encoded|decoded) +[0-9]+ tokens|n_draft|n_predict|n_drafted|n_accept|accept +=" \
      || true
  done
done
