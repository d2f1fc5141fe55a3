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
# the phone's own generation: KV cache, each layer's weights as constants (the adapter's stay inputs)
mt device generate "$OUT/smollm2-bundle" --state "$OUT/phone" \
   --prompt "HAMLET. To be, or not to be" --max-new-tokens 40

echo "== 5. Server-assisted side-tuning: the phone runs the frozen model forward, a server trains a side network =="
echo "phone $("$PY" -c 'import secrets; print(secrets.token_hex(16))')" > "$OUT/side-token"; chmod 600 "$OUT/side-token"
# side NAME RECIPE: the ladder side network (recipes/smollm2_shakespeare_side.py), then the
# LoRA-tuned copy of the top layers (..._side_cut.py: the phone runs layers 0-7 only)
side() {
  local name=$1 recipe=$2
  mt export "$recipe" --side --out "$OUT/smollm2-$name" --store-dtype float16 --variants 1,4
  rm -rf "$OUT/$name-server" "$OUT/$name-phone"
  "$PY" -m mobiletune side serve "$recipe" --out "$OUT/$name-server" --port 0 \
     --token-file "$OUT/side-token" 2> "$OUT/$name-server.log" &
  SERVER=$!
  trap 'kill $SERVER 2>/dev/null || true' EXIT
  for _ in $(seq 240); do [ -f "$OUT/$name-server/server.json" ] && break; sleep 0.5; done
  URL=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['url'])" "$OUT/$name-server/server.json")
  mt device side-train "$OUT/smollm2-$name" --data "$("$PY" -c 'from mobiletune import assets; print(assets.text_path("shakespeare:macbeth"))')" \
     --server "$URL" --token-file "$OUT/side-token" --out "$OUT/$name-phone" --steps 20 --battery auto
  kill $SERVER; wait $SERVER || true; trap - EXIT
  mt ppl --model smollm2-135m --side "$OUT/$name-phone" --text shakespeare:hamlet --seq-len 512 \
     --max-windows 2 | tail -1 > "$OUT/ppl_$name.txt"
  echo "Hamlet perplexity before: $(cat "$OUT/ppl_before.txt")   with the side network $name (20 steps on Macbeth): $(cat "$OUT/ppl_$name.txt")"
  mt device generate "$OUT/smollm2-$name" --side-weights "$OUT/$name-phone/side.safetensors" \
     --prompt "HAMLET. To be, or not to be" --max-new-tokens 20
}
side side recipes/smollm2_shakespeare_side.py
side side-cut recipes/smollm2_shakespeare_side_cut.py

echo "== 6. A federated round on Flower's simulation engine: 3 phones (Shakespeare roles), FedAvg =="
rm -rf "$OUT/fed"
mt fed run recipes/smollm2_shakespeare_fed.py --clients 3 --rounds 2 --out "$OUT/fed" \
   --set local_steps=2 --set eval_max_examples=8 --set mc_items=8
echo "per-round metrics (held-out ppl, bytes, simulated wall-clock and energy): $OUT/fed/metrics.jsonl"

echo "== 7. The phone kit (aarch64 wheels + setup.sh, installs offline) and the device check =="
mt device doctor "$OUT/smollm2-bundle" --battery none
mt device kit "$OUT/smollm2-bundle" --out "$OUT/phone-kit" --python 3.11
echo "copy $OUT/phone-kit.tar.gz to the phone; README: On an Android phone"

echo "== 8. GGUF -> Hugging Face directory =="
mt convert --gguf smollm2-135m --out "$OUT/smollm2-135m-hf"
