#!/usr/bin/env bash
# The main job, end to end on real small models and real text.
set -euo pipefail
PY=${1:-.venv/bin/python}
OUT=${2:-out/demo}
mkdir -p "$OUT"
mt() { echo "+ mobiletune $*" >&2; "$PY" -m mobiletune "$@"; }

echo "== Perplexity on Botchan (4 windows of 512 tokens) =="
mt ppl --model smollm2-135m --text botchan --seq-len 512 --max-windows 4
mt ppl --model gemma3-270m --text botchan --seq-len 512 --max-windows 4

echo "== Generation =="
mt generate --model smollm2-135m --chat --prompt "Write one sentence about the sea." --max-new-tokens 40
mt generate --model gemma3-270m --prompt "The old sailor looked at the sea and" --max-new-tokens 40

echo "== GGUF -> Hugging Face directory =="
mt convert --gguf smollm2-135m --out "$OUT/smollm2-135m-hf"
