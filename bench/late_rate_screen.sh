#!/bin/bash
# The long benchmark's last task (dbpedia) learned again at other rates, on copies of a finished long run's stores
# with their last bank removed: how the later-task rate trades what the last task learns (a 64-example dev slice,
# train.jsonl lines 81-144, never trained on) against what the earlier tasks keep (their dev slices).
#
#   WORK=<cl_benchmark --work-dir of a finished long run> METHOD=inclora PATTERN=inclora-lr0.004-later_lr0.001 \
#     LRS="0.001 0.004" SEEDS="0 1 2 3 4" bench/late_rate_screen.sh        # EARLIER=0 skips the earlier tasks
#
# One JSON record per run in bench/results/late-rate-screen/; the summary (late-rate-screen.md) at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results/late-rate-screen; mkdir -p "$out"
data=$WORK/data; screen=$WORK/dbpedia-screen.jsonl; store=$WORK/late-rate-store
sed -n 81,144p ../shared/data/cl-benchmark/dbpedia/train.jsonl > "$screen"
accuracy() { python -m moram_cli eval "$store" --data "$1" --scoring generate --json 2>/dev/null | python -c "import json,sys; print(json.load(sys.stdin)['accuracy'])"; }
for lr in $LRS; do for seed in $SEEDS; do
  record=$out/$METHOD-dbpedia-s$seed-lr$lr.json
  [ -f "$record" ] && continue
  rm -rf "$store"; cp -r "$WORK/stores/final-$PATTERN-seed$seed" "$store"; rm -rf "$store/banks/008-dbpedia"
  started=$(date +%s)
  python -m moram_cli learn-task "$store" --data "$data/dbpedia/train.jsonl" --name dbpedia --lr "$lr" --json > /dev/null
  earlier=""
  if [ "${EARLIER:-1}" = 1 ]; then
    for task in mnli cb wic copa qqp boolq amazon; do earlier="$earlier\"$task\": $(accuracy "$data/$task/dev.jsonl"), "; done
    earlier=", \"earlier_dev\": {${earlier%, }}"
  fi
  echo "{\"method\": \"$METHOD\", \"task\": \"dbpedia\", \"seed\": $seed, \"lr\": $lr, \"accuracy\": $(accuracy "$screen")$earlier, \"seconds\": $(( $(date +%s) - started ))}" > "$record"
done; done
python - "$out" > "$out.md" <<'PY'
import collections, json, statistics, sys
from pathlib import Path
runs = collections.defaultdict(dict)
for path in Path(sys.argv[1]).glob("*.json"):
    r = json.loads(path.read_text())
    runs[r["method"], r["lr"]][r["seed"]] = r
print("dbpedia learned again as the 8th task of the long benchmark on copies of its 7-task stores; generated answers;")
print("dbpedia on a 64-example dev slice, the earlier tasks on their 16-example dev slices; means over seeds.\n")
print("| method | later rate | seeds | dbpedia | earlier tasks | final row (8 tasks) | dbpedia vs the first rate listed |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for (method, lr), seeds in sorted(runs.items()):
    acc = statistics.fmean(r["accuracy"] for r in seeds.values())
    earlier = [statistics.fmean(r["earlier_dev"].values()) for r in seeds.values() if "earlier_dev" in r]
    row = f"{statistics.fmean(earlier):.3f} | {(7 * statistics.fmean(earlier) + acc) / 8:.3f}" if earlier else "– | –"
    first = min(l for m, l in runs if m == method)
    d = [r["accuracy"] - runs[method, first][s]["accuracy"] for s, r in seeds.items() if s in runs[method, first]]
    paired = f"{statistics.fmean(d):+.3f} ± {statistics.stdev(d) / len(d) ** 0.5:.3f} ({sum(x > 0 for x in d)}/{len(d)})" if lr != first else "–"
    print(f"| {method} | {lr:g} | {len(seeds)} | {acc:.3f} | {row} | {paired} |")
PY
cat "$out.md"
