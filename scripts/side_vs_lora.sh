#!/usr/bin/env bash
# Server-assisted side-tuning against on-device (sharded) LoRA on one real model, the same
# data, token budget and order: eight Shakespeare plays, held-out Hamlet.
#
#   bash scripts/side_vs_lora.sh PYTHON OUT MODEL STEPS [SIDE_RECIPE [KEY=VALUE ...]]
#   bash scripts/side_vs_lora.sh .venv/bin/python out/side-smollm2 smollm2-135m 120
#   bash scripts/side_vs_lora.sh .venv/bin/python out/cut-gemma gemma3-270m 60 \
#       recipes/smollm2_shakespeare_side_cut.py side.cut=4
#
# SIDE_RECIPE (default: the ladder, recipes/smollm2_shakespeare_side.py) and the KEY=VALUE
# overrides after it apply to the side-tuning run only. An OUT that already holds a finished
# LoRA run (lora-phone/adapter) reuses it: the LoRA half does not depend on the side recipe.
#
# Writes OUT/results.md (held-out perplexity before/after, phone wall and peak RSS) and
# OUT/loss.png (loss vs wall-clock for both). The phone and the server are separate
# processes on loopback; the numbers depend on what else runs on the machine.
set -euo pipefail
PY=${1:?python}; OUT=${2:?out dir}; MODEL=${3:-smollm2-135m}; STEPS=${4:-120}
SIDE_RECIPE=${5:-recipes/smollm2_shakespeare_side.py}; shift $(( $# < 5 ? $# : 5 ))
mt() { "$PY" -m mobiletune "$@"; }
mkdir -p "$OUT"
SET=(--set "model=$MODEL" --set "steps=$STEPS")
SIDE_SET=("${SET[@]}"); for kv in "$@"; do SIDE_SET+=(--set "$kv"); done
DATA=$("$PY" - <<'EOF'
from mobiletune import assets
import runpy
plays = runpy.run_path("recipes/smollm2_shakespeare_side.py")["PLAYS"]
print(" ".join(str(assets.text_path(f"shakespeare:{p}")) for p in plays))
EOF
)
ppl() { mt ppl --model "$MODEL" "$@" --text shakespeare:hamlet --seq-len 512 --max-windows 4 | tail -1 | sed 's/ppl=//; s/ tokens=.*//'; }

[ -f "$OUT/side.bundle/manifest.json" ] || mt export "$SIDE_RECIPE" --side \
    "${SIDE_SET[@]}" --out "$OUT/side.bundle" --store-dtype float16 --variants 4
# The LoRA recipe on the side recipe's budget: same steps, warmup, schedule (its own lr;
# bundles train without dropout).
[ -f "$OUT/lora.bundle/manifest.json" ] || mt export recipes/smollm2_shakespeare_lora.py --sharded \
    "${SET[@]}" --set optim.warmup_steps=10 --set lora.dropout=0 --out "$OUT/lora.bundle" --store-dtype float16 --variants 4

echo "phone $("$PY" -c 'import secrets; print(secrets.token_hex(16))')" > "$OUT/token"; chmod 600 "$OUT/token"
rm -rf "$OUT/server" "$OUT/side-phone"
"$PY" -m mobiletune side serve "$SIDE_RECIPE" "${SIDE_SET[@]}" --out "$OUT/server" \
    --port 0 --token-file "$OUT/token" 2> "$OUT/server.log" &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do [ -f "$OUT/server/server.json" ] && break; sleep 0.5; done
URL=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['url'])" "$OUT/server/server.json")
/usr/bin/time -v -o "$OUT/side-phone.time" "$PY" -m mobiletune device side-train "$OUT/side.bundle" \
    --data $DATA --server "$URL" --token-file "$OUT/token" --out "$OUT/side-phone" --battery none
kill $SERVER; wait $SERVER || true; trap - EXIT
if [ ! -f "$OUT/lora-phone/adapter/adapter_config.json" ]; then
  rm -rf "$OUT/lora-phone"
  /usr/bin/time -v -o "$OUT/lora-phone.time" "$PY" -m mobiletune device train "$OUT/lora.bundle" \
      --data $DATA --out "$OUT/lora-phone" --steps "$STEPS" --battery none
fi

BEFORE=$(ppl); SIDE=$(ppl --side "$OUT/side-phone"); LORA=$(ppl --adapter "$OUT/lora-phone/adapter")
field() { grep "$2" "$1" | awk -F': ' '{print $2}'; }
{
  echo "| $MODEL, $STEPS steps x 4 x 128 tokens | Hamlet ppl (4 x 512) | phone wall | phone peak RSS |"
  echo "|---|---|---|---|"
  echo "| base | $BEFORE | | |"
  echo "| side-tuning ($(basename "$SIDE_RECIPE" .py)${*:+ $*}) | $SIDE | $(field "$OUT/side-phone.time" 'Elapsed (wall') | $(( $(field "$OUT/side-phone.time" 'Maximum resident') / 1024 )) MB |"
  echo "| on-device LoRA (sharded, r=8) | $LORA | $(field "$OUT/lora-phone.time" 'Elapsed (wall') | $(( $(field "$OUT/lora-phone.time" 'Maximum resident') / 1024 )) MB |"
} | tee "$OUT/results.md"
"$PY" benchmarks/plot_curves.py "$OUT/loss.png" --title "$MODEL: loss vs wall-clock" \
    "$OUT/server/metrics.jsonl=side-tuning (server clock)" "$OUT/lora-phone/metrics.jsonl=on-device LoRA"
