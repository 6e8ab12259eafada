#!/usr/bin/env bash
# Set up (once) and run the main job: train and evaluate on a config, print the table.
#   bash scripts/train.sh                          # CollegeMsg default
#   bash scripts/train.sh --overwrite              # again, replacing the earlier run
#   bash scripts/train.sh configs/ml-100k.yaml loader.batch_size=256
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
config="configs/collegemsg.yaml"
# A first argument that is a flag (--overwrite, --resume) or an override (key=value)
# leaves the default config in place.
if [[ $# -gt 0 && "$1" != -* && "$1" != *=* ]]; then
    config="$1"
    shift
fi
cd "$root"
exec "$root/.venv/bin/python" -m trainer.main --config "$config" "$@"
