#!/usr/bin/env bash
# The one set-up script: makes (or refreshes) .venv at the repository root
# with the pinned stack, then installs this project into it (editable).
#
#   bash scripts/setup.sh            # CPU stack (laptops, CI)
#   bash scripts/setup.sh --cuda     # CUDA stack on a GPU machine
#   RETRIEVAL_CUDA=1 bash scripts/setup.sh   # same as --cuda
#
# The venv is rebuilt only when missing or stale: a stamp file records a hash
# of this script, requirements/common.txt and pyproject.toml plus the chosen
# flavour; when any of them changes, the next call reinstalls.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

flavour=cpu
if [[ "${1:-}" == "--cuda" || "${RETRIEVAL_CUDA:-0}" == "1" ]]; then
  flavour=cuda
fi

TORCH_VERSION=2.13.0
FBGEMM_VERSION=1.8.0
TORCHREC_VERSION=1.8.0
PYTHON="${PYTHON:-python3}"

venv="$root/.venv"
# pip here warns once per package about this machine's empty local index
# folders, and about torchrec's fbgemm-gpu requirement that --no-deps skips on
# purpose; both are noise, everything else pip says is kept.
pip_quiet() {
  local log status=0
  log=$(mktemp)
  "$@" >"$log" 2>&1 || status=$?
  grep -v -e "is ignored: it is neither a file nor a directory" \
    -e "torchrec .* requires fbgemm-gpu" -e "dependency resolver does not currently" "$log" >&2 || true
  rm -f "$log"
  return "$status"
}
stamp="$venv/.setup-stamp"
want="$flavour $(cat scripts/setup.sh requirements/common.txt pyproject.toml | sha256sum | cut -d' ' -f1)"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi

echo "[setup] building $venv ($flavour stack; this takes a few minutes once)" >&2
if [[ ! -x "$venv/bin/python" ]]; then
  "$PYTHON" -m venv "$venv"
fi
pip=(pip_quiet "$venv/bin/python" -m pip install --disable-pip-version-check -q)

if [[ "$flavour" == cpu ]]; then
  # torch 2.13.0 CPU wheel; fbgemm-gpu-cpu 1.8.0 is the build whose .so loads
  # with torch 2.13.0 (1.7.0 and 1.9.0 fail to load).
  "${pip[@]}" "torch==$TORCH_VERSION" "fbgemm-gpu-cpu==$FBGEMM_VERSION"
else
  # CUDA wheels. Override the index with TORCH_INDEX_URL for another CUDA
  # version, e.g. https://download.pytorch.org/whl/cu128.
  index=(${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"})
  "${pip[@]}" "${index[@]}" "torch==$TORCH_VERSION" "fbgemm-gpu==$FBGEMM_VERSION"
fi
# --no-deps: torchrec's metadata requires the CUDA fbgemm-gpu, which would
# replace the CPU build; its real needs are pinned in requirements/common.txt.
"${pip[@]}" --no-deps "torchrec==$TORCHREC_VERSION"
"${pip[@]}" -r requirements/common.txt
# The project itself, editable and without dependency resolution (pyproject
# deliberately lists no torchrec requirement that pip could resolve on CPU).
"${pip[@]}" --no-deps --no-build-isolation -e .

"$venv/bin/python" - <<'PY'
import torch, fbgemm_gpu, torchrec, torchx, polars, pyarrow  # noqa: F401
print(f"[setup] torch {torch.__version__}, torchrec {torchrec.__version__ if hasattr(torchrec, '__version__') else '?'}, polars {polars.__version__}", flush=True)
PY
echo "$want" > "$stamp"
