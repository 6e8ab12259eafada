"""Top-k retrieval for a list of actors with a trained run.

    python -m trainer.predict --run runs/collegemsg --k 10 --out predictions.parquet \
        [--actors actors.txt] [--actions user_action_type.json] [--exclude-seen]

- `--actors`: a text file of raw actor IDs, one a line (default: every actor of the log).
- `--actions`: a JSON object mapping raw actor ID -> action type (raw value, as in the log)
  of the next action; actors not in it get the most frequent action of the log.
- The history is the actor's whole known log (its last `max_len` events, or
  `model.repeat_window` for the repeat re-scorer; in a shared ID space also the last
  `model.incoming_window` events that reached it, and its contacts' own activity with
  `model.contact_activity`); the request time is one second after the newest event of
  the log. With `--actors` only the partitions of those actors are read, and of their
  contacts when the model reads their activity.
- Output: one row per (actor, rank) with the raw target ID and its score, as parquet, or
  JSON when `--out` ends in `.json`.

Behaviour on odd requests: an actor ID the model never saw, or one that only ever was a
target (no events of its own), is reported and skipped; an action type the model never
saw is an error naming it; an empty actor list writes an empty result.

A user error prints one line `error: ...` on stderr and exits with status 2, no stack
trace. That holds for argparse's own complaints too (a missing option, `--k abc`), and
every argument is checked before any work (loading the data or the model): `--k` >= 1;
`--out` names a file in an existing folder we may write to; `--run` is a run directory
(config.yaml, prepared/, model/); `--actions` is a JSON object; every line of `--actors`
is an integer when the run's log has integer IDs (`data.id_type`), else it names the
file and line.

The model (`runs/<name>/model/`, see trainer/export.py) loads with
`torch.load(weights_only=True)`: no pickled code is ever executed. A damaged or crafted
model file is refused in one line naming it (`ExportError`), as is an export that does
not fit the run's config.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from trainer import allocators

# Before polars and torch allocate anything, as in the trainer's ranks (trainer/allocators.py).
allocators.configure()

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

from configs.loading import ConfigError, load_config
from data.activity import ActivityIndex, ContactActivity
from data.dataset import PreparedDataset, partition_of, prepared_config
from data.prepare import PreparedData, prepare_from_dataset
from data.readers import DataError
from data.sequences import Queries, Sequences
from trainer.distributed import Distributed
from trainer.evaluation import sorted_ids
from trainer.export import EXPORT_DIR, ExportError, load_exported
from trainer.build import build_model, model_scorer, reads_activity
from trainer.scoring import ModelScorer

log = logging.getLogger(__name__)


def top_k(
    scorer: ModelScorer, num_queries: int, candidates: np.ndarray, k: int, seen: list[np.ndarray] | None,
    chunk: int = 65536, dist: Distributed = Distributed(),
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k per query over `candidates`, merged chunk by chunk: ([Q, k] ids, scores),
    ids -1 and scores -inf where fewer than k candidates exist.

    On several ranks each rank passes the candidates it owns (a scorer built on them);
    every rank's top-k of each query chunk is gathered and merged, so every rank returns
    the top-k over the whole vocabulary without any rank holding it. Collective then:
    every rank must call it with the same queries."""
    candidates_t = sorted_ids(candidates)
    ids_out = np.empty((num_queries, k), dtype=np.int64)
    scores_out = np.empty((num_queries, k), dtype=np.float32)
    for q0 in range(0, num_queries, 256):
        rows = slice(q0, min(q0 + 256, num_queries))
        state = scorer.query_state(rows)
        # Start from k empty slots, so every rank's result has k columns to gather.
        best_scores = torch.full((rows.stop - rows.start, k), float("-inf"))
        best_ids = torch.full((rows.stop - rows.start, k), -1, dtype=torch.int64)
        for c0 in range(0, len(candidates_t), chunk):
            ids = candidates_t[c0 : c0 + chunk]
            scores = scorer.score(state, ids)
            if seen is not None:
                for i, past in enumerate(seen[rows]):
                    scores[i, torch.from_numpy(np.isin(ids.numpy(), past))] = float("-inf")
            best_scores, best_ids = _best_k(
                torch.cat([best_scores, scores], dim=1), torch.cat([best_ids, ids.expand(scores.shape[0], -1)], dim=1), k
            )
        if dist.world_size > 1:  # every rank's k best of each query, [Q, ranks * k], merged
            every_scores = dist.gather(best_scores[None]).permute(1, 0, 2).flatten(1)
            every_ids = dist.gather(best_ids[None]).permute(1, 0, 2).flatten(1)
            best_scores, best_ids = _best_k(every_scores, every_ids, k)
        ids_out[rows] = best_ids.numpy()
        scores_out[rows] = best_scores.numpy()
    return ids_out, scores_out


def _best_k(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the k highest scores and their IDs."""
    keep = scores.topk(min(k, scores.shape[1]), dim=1)
    return keep.values, ids.gather(1, keep.indices)


def predict(run_dir: Path, k: int, actors: list | None, actions: dict | None, exclude_seen: bool) -> pl.DataFrame:
    config = load_config(run_dir / "config.yaml")
    dataset = open_prepared(run_dir, config)
    parts = None
    if actors is not None:
        # Only the partitions holding the requested actors' histories (and the events
        # that reached them) are read; the ID maps tell which.
        index = dataset.id_maps()[0].to_index(actors)
        parts = np.unique(partition_of(index[index >= 0], dataset.partitions)).tolist()
    prepared = prepare_from_dataset(dataset, config.data, parts=parts)
    event_log = prepared.log
    seqs, stats = prepared.seqs, prepared.stats
    counts = dataset.manifest["counts"]
    model = build_model(config, prepared)
    _load_weights(model, run_dir)
    model.eval()

    # Which sequences to query: raw actor IDs -> sequence index.
    sequence_of_actor = np.full(len(event_log.actor_ids), -1, dtype=np.int64)
    sequence_of_actor[seqs.actor] = np.arange(seqs.num_sequences)
    if actors is None:
        sequence = np.arange(seqs.num_sequences)
    else:
        index = event_log.actor_ids.to_index(actors)
        unknown = [a for a, i in zip(actors, index) if i < 0]
        if unknown:
            log.warning("skipping %d actor ID(s) the model never saw: %s", len(unknown), unknown[:10])
        sequence = sequence_of_actor[index[index >= 0]]
        if (sequence < 0).any():
            # In a shared ID space an ID may only ever have been a target: no history to use.
            log.warning("skipping %d actor(s) with no events of their own", int((sequence < 0).sum()))
            sequence = sequence[sequence >= 0]
    if len(sequence) == 0:
        return pl.DataFrame(schema={"actor": event_log.actor_ids.raw.dtype, "rank": pl.Int64, "target": event_log.target_ids.raw.dtype, "score": pl.Float32})

    most_frequent = int(np.argmax(counts["events_per_action"]))  # over the whole log, not the partitions read
    queries = Queries.requests(
        seqs, sequence, _next_actions(event_log, seqs, sequence, actions, most_frequent), counts["max_timestamp"]
    )
    candidates = stats.candidates  # built from the mask: once
    options = {}
    if parts is not None and reads_activity(config, event_log.shared_id_space):
        options["activity"] = _contacts_activity(dataset, prepared, sequence, parts)
    scorer = model_scorer(model, config, prepared, queries, candidates, "all", **options)
    seen = [seqs.targets[seqs.offsets[s] : seqs.offsets[s + 1]] for s in sequence] if exclude_seen else None
    ids, scores = top_k(scorer, len(sequence), candidates, k, seen)
    kept = min(k, len(candidates))
    return pl.DataFrame(
        {
            "actor": np.repeat(event_log.actor_ids.to_raw(seqs.actor[sequence]), kept),
            "rank": np.tile(np.arange(1, kept + 1), len(sequence)),
            "target": event_log.target_ids.to_raw(ids[:, :kept].reshape(-1)),
            "score": scores[:, :kept].reshape(-1),
        }
    )


def _contacts_activity(
    dataset: PreparedDataset, prepared: PreparedData, sequence: np.ndarray, parts: list[int]
) -> ContactActivity:
    """The activity of every possible contact of the requested actors (`model.contact_activity`):
    those they wrote to and those who wrote to them live in any partition. The people of
    the partitions `parts` already read are indexed from what `prepared` holds (no copy);
    the other contacts' partitions are read (sent: events partitions, received: incoming
    ones), and no other. The two hold different people, so the sources add up exactly."""
    seqs = prepared.seqs
    actors = seqs.actor[sequence]
    wrote_to = np.concatenate([seqs.targets[seqs.offsets[s] : seqs.offsets[s + 1]] for s in sequence])
    incoming = prepared.incoming_events("all")
    wrote_in = np.concatenate([incoming.sources[incoming.offsets[a] : incoming.offsets[a + 1]] for a in actors])
    people = np.unique(np.concatenate([wrote_to, wrote_in]))
    others = sorted(set(np.unique(partition_of(people, dataset.partitions)).tolist()) - set(parts))
    sent = dataset.read_events(others, "events").select("actor", "timestamp")
    received = dataset.read_events(others, "incoming").select("target", "timestamp")
    read = ActivityIndex.from_events(
        np.concatenate([sent["actor"].to_numpy(), received["target"].to_numpy()]),
        np.concatenate([sent["timestamp"].to_numpy(), received["timestamp"].to_numpy()]),
        incoming.num_people,
    )
    held = prepared.activity("all")
    return ContactActivity(ActivityIndex(held.sources + read.sources, held.num_people))


def _load_weights(model: torch.nn.Module, run_dir: Path) -> None:
    """The export into `model`, refused in one line (not load_state_dict's many) when it
    was written for another model: config.yaml edited since, or a crafted file."""
    state = load_exported(run_dir)
    expected = {key: value.shape for key, value in model.state_dict().items() if isinstance(value, torch.Tensor)}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(key for key in expected.keys() & state.keys() if state[key].shape != expected[key])
    if missing or unexpected or wrong:
        problems = (("missing", missing), ("unexpected", unexpected), ("wrong shape of", wrong))
        found = [f"{what} {keys[:3]}" for what, keys in problems if keys]
        raise ExportError(
            f"{run_dir / EXPORT_DIR}: does not fit the model of {run_dir / 'config.yaml'} ({'; '.join(found)}); "
            f"train the run again: python -m trainer.main --config {run_dir / 'config.yaml'} --overwrite"
        )
    model.load_state_dict(state)


def _next_actions(
    event_log, seqs: Sequences, sequence: np.ndarray, actions: dict | None, most_frequent: int
) -> np.ndarray:
    result = np.full(len(sequence), most_frequent, dtype=np.int64)
    if not actions:
        return result
    labels = {label: i for i, label in enumerate(event_log.action_values)}
    raw_of_sequence = event_log.actor_ids.to_raw(seqs.actor[sequence])
    for i, raw in enumerate(raw_of_sequence):
        value = actions.get(str(raw))
        if value is None:
            continue
        key = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
        if key not in labels:
            raise DataError(
                f"--actions: actor {raw!r} asks for action type {value!r}, which the model never saw; "
                f"known types: {', '.join(event_log.action_values)}"
            )
        result[i] = labels[key]
    return result


class UsageError(ValueError):
    """A bad command line: one line naming the option at fault."""


class _Parser(argparse.ArgumentParser):
    # argparse prints a usage block and exits from inside parse_args; raising instead gives
    # the one `error:` line every other user error here gets (`--help` still shows usage).
    def error(self, message: str):
        raise UsageError(message)


def _positive_int(text: str) -> int:
    if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 (how many targets per actor), got {text!r}")
    return int(text)


def _check_out(out: Path) -> None:
    """Fail now, not after all the work, when the result could not be written."""
    folder = out.parent
    if out.is_dir():
        raise UsageError(f"--out: {out} is a directory; give a file name ending in .parquet or .json")
    if not folder.is_dir():
        raise UsageError(f"--out: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UsageError(f"--out: cannot write {out} (no write permission)")


def open_prepared(run_dir: Path, config) -> PreparedDataset:
    """The run's prepared dataset (`data.prepared_path`, else `<run>/prepared`): its
    manifest read, its files' sizes checked, and that it is the dataset the model was
    trained on (the same data config and, per results.json, the same log), else the IDs
    would map to other people."""
    dataset = PreparedDataset.open(Path(config.data.prepared_path).expanduser() if config.data.prepared_path
                                   else run_dir / "prepared")
    expected = prepared_config(config.data)
    differing = sorted(k for k in expected if dataset.manifest.get("data_config", {}).get(k) != expected[k])
    results = run_dir / "results.json"
    trained_on = json.loads(results.read_text()).get("data", {}) if results.is_file() else {}
    counts = dataset.manifest.get("counts", {})
    changed = [k for k in ("events", "actors", "targets") if k in trained_on and trained_on[k] != counts.get(k)]
    if differing or changed:
        what = ", ".join([f"data.{k}" for k in differing] + [f"{k} {trained_on[k]:,} -> {counts.get(k)}" for k in changed])
        raise DataError(
            f"{dataset.directory}: prepared from other data than the model was trained on ({what}); "
            f"train the run again: python -m trainer.main --config {run_dir / 'config.yaml'} --overwrite"
        )
    return dataset


def _check_run(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise UsageError(f"--run: {run_dir} is not a directory; give a run directory written by python -m trainer.main")
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(
            f"--run: {run_dir} is not a run directory (no config.yaml); give one written by python -m trainer.main"
        )
    if not (run_dir / EXPORT_DIR).is_dir():
        raise UsageError(f"--run: {run_dir}: no exported model ({EXPORT_DIR}/); train first with python -m trainer.main")


def _read_text(option: str, path: str, expected: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{option}: {path} does not exist; {expected}") from None
    except IsADirectoryError:
        raise UsageError(f"{option}: {path} is a directory; {expected}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{option}: {path} is not UTF-8 text; {expected}") from None
    except OSError as e:
        raise UsageError(f"{option}: cannot read {path} ({e.strerror})") from None


_INTEGER = re.compile(r"[+-]?[0-9]+")


def _read_actors(path: str, id_type: str) -> list:
    """Raw actor IDs, one a line (blank lines skipped), typed as the run's log types them."""
    actors: list = []
    text = _read_text("--actors", path, "expected a text file of raw actor IDs, one a line")
    # split("\n"), not splitlines(): line numbers must match an editor's (splitlines also
    # breaks at form feeds and other separators).
    for number, line in enumerate(text.split("\n"), start=1):
        raw = line.strip()
        if not raw:
            continue
        if id_type == "str":
            actors.append(raw)
        elif _INTEGER.fullmatch(raw) and -(2**63) <= int(raw) < 2**63:  # the ID maps hold int64
            actors.append(int(raw))
        else:
            raise UsageError(f"{path}:{number}: expected an integer actor ID, got {raw!r} (the run's log has integer IDs)")
    return actors


_JSON_TYPES = {list: "list", str: "string", int: "number", float: "number", bool: "true/false", type(None): "null"}


def _read_actions(path: str) -> dict:
    expected = "expected a JSON object {actor ID: action type}"
    text = _read_text("--actions", path, expected)
    try:
        actions = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--actions: {path} is not JSON ({e.msg}, line {e.lineno}); {expected}") from None
    if not isinstance(actions, dict):
        raise UsageError(f"--actions: {path} holds a JSON {_JSON_TYPES.get(type(actions), 'value')}; {expected}")
    for actor, action in actions.items():
        if isinstance(action, bool) or not isinstance(action, (str, int, float)):
            raise UsageError(
                f"--actions: {path}: actor {actor!r} maps to a JSON {_JSON_TYPES.get(type(action), 'object')}; "
                f"{expected}, each action type a string or number as in the log"
            )
    return actions


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="trainer.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory written by trainer.main")
    parser.add_argument("--k", type=_positive_int, default=10, help="targets per actor, >= 1 (default: 10)")
    parser.add_argument("--actors", help="text file of raw actor IDs, one a line (default: all)")
    parser.add_argument("--actions", help="JSON file: raw actor ID -> next action type")
    parser.add_argument("--exclude-seen", action="store_true", help="exclude targets the actor already interacted with")
    parser.add_argument("--out", required=True, help="output .parquet or .json")
    try:
        args = parser.parse_args(argv)
        # Every check before any work: a typo must not cost a data load and a model load.
        out = Path(args.out)
        _check_out(out)
        run_dir = Path(args.run)
        _check_run(run_dir)
        config = load_config(run_dir / "config.yaml")
        open_prepared(run_dir, config)  # present and whole, before any work
        actions = _read_actions(args.actions) if args.actions else None
        actors = _read_actors(args.actors, config.data.id_type) if args.actors else None
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
        frame = predict(run_dir, args.k, actors, actions, args.exclude_seen)
    except (UsageError, ConfigError, DataError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out.suffix == ".json":
        out.write_text(json.dumps(frame.to_dicts()))
    else:
        frame.write_parquet(out)
    print(f"wrote {frame.height} rows for {frame['actor'].n_unique() if frame.height else 0} actor(s) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
