"""Full-ranking evaluation throughput and memory, through the product's own path
(trainer/scoring.py ModelScorer + trainer/evaluation.py full_ranking_ranks).

    .venv/bin/python bench/peak.py && .venv/bin/python bench/eval.py

1. Throughput: 1e6 candidates, D = 256, an (untrained) HSTU query tower; every candidate
   scored for each query. scores_per_s counts query x candidate scores; MFU counts the
   score matmul's 2 D FLOPs per score against bench/peak.py's fp32 peak. Candidate
   vectors are computed once per evaluation (reported apart, as candidate_vectors_s).
2. Memory: 1e7 candidates, D = 64 (a 1e7 x 256 fp32 table alone is 10 GB, more than this
   benchmark should take from a 24 GB machine): peak resident memory of the process, what
   the ID table and the candidate vectors account for, and what the ranking adds on top
   of everything held before it (the kernel's peak-RSS count is restarted just before):
   that part is bounded by the chunk sizes (query_chunk_size x candidate_chunk_size
   scores and the query chunk's encodings), not by the vocabulary.

Writes bench/results/eval.json with `mfu`, `scores_per_s`, `peak_rss_gb_1e7`.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import peak_gflops, write_result  # noqa: E402
from configs.loading import load_config  # noqa: E402
from configs.schema import EvalConfig  # noqa: E402
from data.prepare import prepare  # noqa: E402
from trainer.evaluation import full_ranking_ranks  # noqa: E402
from trainer.build import build_model, model_scorer  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "synthetic-scale.yaml"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _status_gb(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc (Linux), in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    raise KeyError(field)


def reset_peak_rss() -> float:
    """Restart the kernel's peak-RSS count (VmHWM) from now; returns the RSS now."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_gb("VmRSS")


def measure(num_candidates: int, dim: int, num_queries: int, query_chunk: int, candidate_chunk: int) -> dict:
    data = f"synthetic:events={int(num_candidates * 1.2)},actors={max(num_candidates // 10, num_queries)},targets={num_candidates},cover_targets=true"
    config = load_config(CONFIG, [
        f"data.path={data}", f"model.embedding_dim={dim}", "model.num_layers=4", "model.num_heads=4",
        f"eval.max_queries={num_queries}",
    ])
    prepared = prepare(config.data)
    model = build_model(config, prepared).eval()
    queries = prepared.split.queries(prepared.seqs, "test", config.eval.max_queries)
    candidates = prepared.stats.candidates
    start = time.perf_counter()
    # Every vector held (computed once, timed apart), whatever eval.max_held_vectors_gb says.
    scorer = model_scorer(model, config, prepared, queries, candidates, "test", max_held_bytes=float("inf"))
    vectors_s = time.perf_counter() - start
    # What the ranking itself adds on top of the model, the table and the candidate vectors.
    before_ranking_gb = reset_peak_rss()
    start = time.perf_counter()
    full_ranking_ranks(
        scorer, prepared.seqs.targets[queries.position], candidates,
        query_chunk_size=query_chunk, candidate_chunk_size=candidate_chunk,
    )
    ranking_s = time.perf_counter() - start
    scores = len(queries) * len(candidates)
    return {
        "candidates": len(candidates), "dim": dim, "queries": len(queries),
        "query_chunk_size": query_chunk, "candidate_chunk_size": candidate_chunk,
        "candidate_vectors_s": vectors_s, "ranking_s": ranking_s,
        "scores_per_s": scores / ranking_s, "gflops": 2 * dim * scores / ranking_s / 1e9,
        "table_gb": len(candidates) * dim * 4 / 1e9, "candidate_vectors_gb": scorer.vectors.held_bytes / 1e9,
        "peak_rss_gb": peak_rss_gb(),
        "rss_before_ranking_gb": before_ranking_gb,
        "ranking_peak_over_before_gb": _status_gb("VmHWM") - before_ranking_gb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=1024)
    defaults = EvalConfig()
    parser.add_argument("--query-chunk", type=int, default=defaults.query_chunk_size)
    parser.add_argument("--candidate-chunk", type=int, default=defaults.candidate_chunk_size)
    parser.add_argument("--skip-memory", action="store_true", help="only the 1e6-candidate throughput")
    args = parser.parse_args()
    peak = peak_gflops("fp32")

    throughput = measure(10**6, 256, args.queries, args.query_chunk, args.candidate_chunk)
    figures = {
        "mfu": throughput["gflops"] / peak, "scores_per_s": throughput["scores_per_s"],
        "peak_fp32_gflops": peak, "throughput_1e6": throughput,
    }
    print(
        f"1e6 candidates, D 256: {throughput['scores_per_s'] / 1e6:.0f} M scores/s, "
        f"{throughput['gflops']:.1f} GFLOP/s = MFU {figures['mfu']:.2f} of {peak:.1f}; "
        f"candidate vectors {throughput['candidate_vectors_s']:.1f} s"
    )
    if not args.skip_memory:
        memory = measure(10**7, 64, 256, args.query_chunk, args.candidate_chunk)
        figures.update({"peak_rss_gb_1e7": memory["peak_rss_gb"], "memory_1e7": memory})
        print(
            f"1e7 candidates, D 64: peak RSS {memory['peak_rss_gb']:.2f} GB (table {memory['table_gb']:.2f} GB, "
            f"candidate vectors {memory['candidate_vectors_gb']:.2f} GB); the ranking itself added "
            f"{max(memory['ranking_peak_over_before_gb'], 0.0) * 1e3:.0f} MB over the {memory['rss_before_ranking_gb']:.2f} GB "
            "held before it"
        )
    print(f"wrote {write_result('eval', figures)}")


if __name__ == "__main__":
    main()
