#!/usr/bin/env bash
# Iterative (on-policy) DPO on prefer's built-in task, two rounds of
#   sample K completions per prompt → score them with a judge → pair best with worst → prefer train
# where each round samples with the adapter the previous round trained and trains against it as
# the reference. After each round it prints the mean judge score of the policy's fresh samples and
# its accuracy on held-out judged pairs: completions of the built-in task's held-out prompts (other
# topics than the training prompts), sampled once from the base and paired by the same judge. The
# accuracy is the share of those pairs whose judged-better completion the policy rewards more
# (β × the policy − base log-ratio): 0 for the base itself, rising as the policy learns what the
# judge prefers.
#
# The built-in base is a small random Llama whose samples are byte soup, so the judge is one such a
# model can learn: `regex:[a-z ]` counts plain lowercase letters and spaces. With a real model, use
# a judge for the task (`exact` against reference answers, or `command:` running a reward model).
#
# Usage: examples/iterative_dpo.sh [OUT_DIR]      (PREFER=path/to/prefer picks the binary)
set -euo pipefail
PREFER=${PREFER:-prefer}
OUT=${1:-runs/iterative}
JUDGE='regex:[a-z ]'
SAMPLING=(--samples 4 --max-new-tokens 24 --temperature 1.0 --judge "$JUDGE")
rm -rf "$OUT"
mkdir -p "$OUT"

# The built-in job writes its base model and data under default-task/; one step is enough for that
# (that step's adapter is not used).
"$PREFER" train --output-dir "$OUT/setup" --max-steps 1 --eval-strategy no --save-strategy no \
    >"$OUT/setup.log" 2>&1
TASK="$OUT/setup/default-task"
MODEL="$TASK/model"

# Held-out pairs: the held-out prompts' completions, sampled once from the base and judged.
"$PREFER" pairs --from-prompts "$TASK/eval.jsonl" --model "$MODEL" "${SAMPLING[@]}" \
    --min-score-diff 2 --seed 100 --output "$OUT/heldout.jsonl" >/dev/null

# The held-out accuracy of an adapter against the base (none: the base itself).
accuracy() {
    local adapter=()
    [ -n "$1" ] && adapter=(--adapter "$1")
    "$PREFER" eval --model "$MODEL" "${adapter[@]}" --data "$OUT/heldout.jsonl" --json |
        grep -o '"rewards/accuracies":[0-9.eE+-]*' | cut -d: -f2
}

# The mean judge score of a policy's samples of the training prompts (all of them: no margin).
mean_score() {
    "$PREFER" pairs --from-prompts "$TASK/train.jsonl" --model "$MODEL" ${1:+--adapter "$1"} \
        "${SAMPLING[@]}" --min-score-diff 0 --seed 7 --output "$OUT/scored.jsonl" >/dev/null
    grep -o '"chosen_score":[0-9.eE+-]*\|"rejected_score":[0-9.eE+-]*' "$OUT/scored.jsonl" |
        cut -d: -f2 | awk '{ s += $1; n += 1 } END { printf "%.2f", s / n }'
}

ADAPTER=""
echo "round 0 (the base): judge score $(mean_score "$ADAPTER"), held-out accuracy $(accuracy "$ADAPTER")"
for ROUND in 1 2; do
    PAIRS="$OUT/pairs-$ROUND.jsonl"
    # Sample the training prompts with the current policy (the rows' other keys are ignored).
    "$PREFER" pairs --from-prompts "$TASK/train.jsonl" --model "$MODEL" ${ADAPTER:+--adapter "$ADAPTER"} \
        "${SAMPLING[@]}" --min-score-diff 2 --seed "$ROUND" --output "$PAIRS"
    # Train on them, starting from (and referenced against) the current policy.
    "$PREFER" train --model "$MODEL" ${ADAPTER:+--adapter "$ADAPTER"} --data "$PAIRS" \
        --output-dir "$OUT/round-$ROUND" --eval-ratio 0 \
        --learning-rate 5e-3 --num-train-epochs 2 --per-device-train-batch-size 8 \
        --r 8 --lora-alpha 16 --target-modules all-linear --max-length 96 \
        --save-strategy no --logging-steps 10 >"$OUT/round-$ROUND.log" 2>&1
    ADAPTER="$OUT/round-$ROUND/adapter"
    echo "round $ROUND: judge score $(mean_score "$ADAPTER"), held-out accuracy $(accuracy "$ADAPTER")"
done
