"""What choosing the contact offset on validation costs (`model.contact_offset_on_validation`,
on by default): the validation ranked at every offset tried (models/repeat.py
CONTACT_OFFSETS, 7), one pass against one full validation per offset.

    .venv/bin/python bench/contact_offset.py                    # both workloads below
    .venv/bin/python bench/contact_offset.py --skip-synthetic   # CollegeMsg only

- one pass (trainer/loop.py `choose_contact_offset`): the model at offset 0; the candidate
  vectors, the validation queries and each chunk's scores are computed once, and only the
  count is made per offset, each contact's score shifted in it (trainer/evaluation.py
  `full_ranking_ranks_at_bonus_shifts`);
- one validation per offset (how it was chosen until 2026-12-05): the model set to each
  offset, then `query_ranks("valid")`, which computes the vectors and encodes the
  queries every time.

Both are timed back to back in one process on the same (untrained) model, and their ranks
are checked equal offset by offset (the one-pass ranks are bitwise the others, tested in
tests/trainer/test_evaluation.py and test_loop.py). Workloads: the embedded CollegeMsg (1,862 candidates: the
queries dominate) and a synthetic log of 1e6 targets at configs/synthetic-scale.yaml's
model (D = 64; the candidate vectors dominate), --queries validation queries.

Writes bench/results/contact_offset.json: per workload the seconds of each way and
`speedup` (one validation per offset / one pass).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.common import write_result  # noqa: E402
from configs.loading import load_config  # noqa: E402
from data.prepare import prepare  # noqa: E402
from models.repeat import CONTACT_OFFSETS  # noqa: E402
from trainer.loop import Trainer  # noqa: E402
from trainer.metrics import MetricsLogger  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def measure(config_name: str, overrides: list[str]) -> dict:
    config = load_config(CONFIG_DIR / f"{config_name}.yaml", ["model.contact_offset_on_validation=true", *overrides])
    trainer = Trainer(config, prepare(config.data), MetricsLogger(None, enabled=False))
    model = trainer.model

    start = time.perf_counter()
    per_offset = {}
    for offset in CONTACT_OFFSETS:
        model.set_contact_offset(offset)
        per_offset[offset] = trainer.query_ranks("valid")
    per_offset_s = time.perf_counter() - start

    model.set_contact_offset(0.0)
    start = time.perf_counter()
    one_pass = trainer.query_ranks_at_bonus_shifts("valid", CONTACT_OFFSETS)
    one_pass_s = time.perf_counter() - start

    differ = [offset for offset in CONTACT_OFFSETS if not np.array_equal(per_offset[offset], one_pass[offset])]
    if differ:
        raise SystemExit(f"{config_name}: the one-pass ranks differ from the per-offset ones at offsets {differ}")
    return {
        "config": config_name, "overrides": overrides, "offsets": len(CONTACT_OFFSETS),
        "queries": len(one_pass[0.0]), "candidates": len(trainer.prepared.stats.candidates),
        "one_validation_per_offset_s": per_offset_s, "one_pass_s": one_pass_s, "speedup": per_offset_s / one_pass_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1000, help="validation queries of the synthetic log")
    parser.add_argument("--skip-synthetic", action="store_true", help="CollegeMsg only")
    args = parser.parse_args()
    workloads = {"collegemsg": ("collegemsg", [])}
    if not args.skip_synthetic:
        data = "synthetic:events=1.2e6,actors=1e5,targets=1e6,cover_targets=true"
        workloads["synthetic_1e6"] = ("synthetic-scale", [f"data.path={data}", f"eval.max_queries={args.queries}"])
    figures = {}
    for name, (config_name, overrides) in workloads.items():
        figures[name] = result = measure(config_name, overrides)
        print(
            f"{name}: {result['queries']} validation queries x {result['candidates']:,} candidates, "
            f"{result['offsets']} offsets: one validation per offset {result['one_validation_per_offset_s']:.1f} s, "
            f"one pass {result['one_pass_s']:.1f} s ({result['speedup']:.1f}x)"
        )
    print(f"wrote {write_result('contact_offset', figures)}")


if __name__ == "__main__":
    main()
