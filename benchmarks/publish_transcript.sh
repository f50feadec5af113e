#!/usr/bin/env bash
# A publish transcript against the loopback mock Hub (tests/helpers/hub_server.py), offline:
#   bash benchmarks/publish_transcript.sh
# builds a two-output recipe (a fused pipeline, a LoRA) on the built-in tiny-sd into a temporary folder, then shows `publish --dry-run`,
# `publish` (one commit + tag per output) and `publish` again (already published: no commit).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
$PY -m tests.helpers.hub_server > "$work/hub.env" &
server=$!
for _ in $(seq 50); do [ -s "$work/hub.env" ] && break; sleep 0.1; done
set -a; source "$work/hub.env"; set +a
export HF_HUB_OFFLINE=0 HF_HUB_DISABLE_TELEMETRY=1
cat > "$work/recipe.yaml" <<'YAML'
name: transcript
base: builtin:tiny-sd
adapters: {style: builtin:tiny-sd/style}
fuse: {adapters: [style], lora_scale: 0.8}
outputs:
  fused:
    kind: pipeline
    path: fused
    publish: {repo: "lorarecipe-demo/{{ name }}-fused"}
  lora:
    kind: lora
    adapter: style
    path: lora
    publish: {repo: "lorarecipe-demo/{{ name }}-lora", commit_message: "style LoRA, built by lorarecipe"}
YAML
run() { echo "\$ lorarecipe $*" | sed "s|$work|<work>|g"; $PY -m lorarecipe "$@" 2>&1 | sed "s|$work|<work>|g"; echo; }
run build "$work/recipe.yaml" --out "$work/out" --quiet
run publish "$work/recipe.yaml" --out "$work/out" --dry-run
run publish "$work/recipe.yaml" --out "$work/out"
run publish "$work/recipe.yaml" --out "$work/out"
