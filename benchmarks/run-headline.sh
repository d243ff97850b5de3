#!/bin/bash
# The headline experiment, its design ablations and the diversity study end to end, in the order
# that gives the main comparison first, each part retried (a re-run continues where it stopped):
#
#   nohup benchmarks/run-headline.sh > outputs/logs/run-headline.log 2>&1 &
#
# 1. data, then E-CAR and the flow-DiT; 2. their rows (an interim report under
# outputs/headline/interim); 3. the headline's other models (full window, clean estimate), all
# rows, the final report; 4. the diversity study; 5. the design ablations; 6. the per-stage
# diagnostic. ~15 hours on 2 CPU cores; logs under outputs/logs.
cd "$(dirname "$0")/.." || exit 1
mkdir -p outputs/logs
export RAY_memory_usage_threshold=${RAY_memory_usage_threshold:-0.98}
run() {
    for try in 1 2 3; do
        echo "$(date -Is) start $* (try $try)"
        nice -n 5 python "$@" && { echo "$(date -Is) done $*"; return 0; }
        sleep 10
    done
    return 1
}
interim=outputs/headline/interim
run benchmarks/headline.py --parts data train --models ecar dit >> outputs/logs/headline-train.log 2>&1
run benchmarks/headline.py --parts sample evaluate report --models ecar dit --results-dir $interim \
    >> outputs/logs/headline-core.log 2>&1
run benchmarks/headline.py --parts train >> outputs/logs/headline-train.log 2>&1
run benchmarks/headline.py --parts sample evaluate report >> outputs/logs/headline-sample.log 2>&1
run benchmarks/diversity.py >> outputs/logs/diversity.log 2>&1
run benchmarks/ablations.py >> outputs/logs/ablations.log 2>&1
run benchmarks/stages.py >> outputs/logs/stages.log 2>&1
