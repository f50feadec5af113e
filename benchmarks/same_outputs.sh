#!/usr/bin/env bash
# Are two commits' outputs byte-identical? For refactors that must not change behaviour.
#   bash benchmarks/same_outputs.sh OLD_REV [NEW_REV]     (NEW_REV: the working tree)
# Builds recipes/demo.yaml and benchmarks/same_outputs/*.yaml (tiny SD, SDXL, FLUX.1: merges, per-block
# weights, subsets, dtypes, single files, kohya LoRAs, grids) with each commit's code, on both executors
# (auto, diffusers), plus a second auto build from the warm factor cache; then compares the sha256 of
# every output file (manifests and .lorarecipe/ state excluded: they hold times and paths).
# Offline, CPU, a few minutes. Prints "IDENTICAL (N files)" or the differing files and exits 1.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
old=$1; new=${2:-}
py=${PYTHON:-$repo/.venv/bin/python}
work=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$work/old" >/dev/null 2>&1 || true;
      [ -n "$new" ] && git -C "$repo" worktree remove --force "$work/new" >/dev/null 2>&1; rm -rf "$work"' EXIT
git -C "$repo" worktree add --detach "$work/old" "$old" >/dev/null 2>&1
if [ -n "$new" ]; then git -C "$repo" worktree add --detach "$work/new" "$new" >/dev/null 2>&1; code_new=$work/new
else code_new=$repo; fi
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
recipes=()
for recipe in "$repo/recipes/demo.yaml" "$repo"/benchmarks/same_outputs/*.yaml; do
  if PYTHONPATH=$work/old "$py" -m lorarecipe validate "$recipe" >/dev/null 2>&1; then recipes+=("$recipe")
  else echo "skipped $(basename "$recipe"): $old cannot validate it (a feature it does not have)"; fi
done
build_all() {  # CODE OUT
  local code=$1 out=$2
  mkdir -p "$out/cache"
  export PYTHONPATH=$code LORARECIPE_CACHE=$out/cache
  for recipe in "${recipes[@]}"; do
    name=$(basename "$recipe" .yaml)
    for executor in auto diffusers; do
      "$py" -m lorarecipe build "$recipe" --out "$out/$name-$executor" --executor "$executor" --quiet
    done
    "$py" -m lorarecipe build "$recipe" --out "$out/$name-auto" --force --quiet  # factors cached
  done
  (cd "$out" && find . -path ./cache -prune -o -type f ! -name manifest.json ! -path '*/.lorarecipe/*' -print \
     | sort | xargs sha256sum) > "$out.sums"
}
build_all "$work/old" "$work/out-old"
build_all "$code_new" "$work/out-new"
if cmp -s "$work/out-old.sums" "$work/out-new.sums"; then
  echo "IDENTICAL ($(wc -l < "$work/out-new.sums") files)"
else
  diff "$work/out-old.sums" "$work/out-new.sums" || true
  exit 1
fi
