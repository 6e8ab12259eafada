#!/usr/bin/env bash
# Set up (once) and run the main job: train and evaluate on a config, print the table.
#   bash scripts/train.sh                          # CollegeMsg default
#   bash scripts/train.sh configs/ml-100k.yaml loader.batch_size=256
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
config="${1:-configs/collegemsg.yaml}"
shift || true
cd "$root"
exec "$root/.venv/bin/python" -m trainer.main --config "$config" "$@"
