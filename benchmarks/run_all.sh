#!/usr/bin/env bash
# Every benchmark in one run (`make bench`, ~10 min): each script's markdown goes to benchmarks/results/NAME.md,
# headed by its command and start time; benchmarks/README.md's table is read off one such run. Run it on an idle
# machine: the ratios are measured within each script, but a busy neighbour still skews them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=benchmarks/results
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

run() {
    local name=$1
    shift
    echo "== $name: $*" >&2
    {
        echo "\`$*\` — started $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(nproc) cores"
        echo
        "$PY" "$@" 2> "$out/$name.log"
    } | tee "$out/$name.md"
}

run tokenize benchmarks/tokenize_bench.py
run pretrain benchmarks/pretrain_bench.py
run generate benchmarks/generate.py
run speculative benchmarks/speculative.py
run sft benchmarks/sft_bench.py
run serve benchmarks/serve.py
