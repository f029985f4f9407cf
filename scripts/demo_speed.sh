#!/bin/bash
# Steps/s of the demo config: a git revision (default: main before issue 15) against this
# checkout with its allocator and with glibc (MOE_JAX_ALLOCATOR=system), alternated.
#   flock /tmp/cpu.lock scripts/demo_speed.sh [REV] [STEPS] [REPS]
set -euo pipefail
REV=${1:-6101cee}; STEPS=${2:-800}; REPS=${3:-2}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=$HERE/.venv/bin/python
OUT=$(mktemp -d /tmp/demo_speed.XXXX)
git -C "$HERE" worktree add -f --detach "$OUT/before_tree" "$REV" >/dev/null
trap 'git -C "$HERE" worktree remove --force "$OUT/before_tree"' EXIT
ARGS="--config=configs/vit/fashion_mnist.py:soft_moe,tiny --config.num_train_steps=$STEPS
  --config.eval_every_steps=$STEPS --config.checkpoint_every_steps=$STEPS --config.log_every_steps=100"
for rep in $(seq "$REPS"); do
  for v in before after after_glibc; do
    case $v in
      before) dir=$OUT/before_tree; env=();;
      after) dir=$HERE; env=();;
      after_glibc) dir=$HERE; env=(MOE_JAX_ALLOCATOR=system);;
    esac
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    (cd "$dir" && env "${env[@]}" PYTHONPATH="$dir" "$PY" -m moe_jax.train.main $ARGS \
       --workdir="$OUT/$v.$rep" > "$OUT/$v.$rep.log" 2>&1)
    "$PY" -c "import json; d = json.load(open('$OUT/$v.$rep/results.json'))
print(f\"$v rep $rep: {d['steps_per_sec']:.2f} steps/s, test accuracy {d['final']['test_accuracy']:.4f}, load $load\")"
  done
done
