"""Top-k retrieval with a trained run: raw IDs out, exclude-seen, odd requests, safe loading."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
import torch

from configs.loading import load_config
from data.dataset import PreparedDataset, partition_of, prepared_config
from data.readers import DataError
from models.repeat import CONTACT_OFFSETS
import trainer.predict as predict_module
from trainer.export import load_exported
from trainer.main import main
from trainer.predict import main as predict_main
from trainer.predict import predict

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(["--config", str(ROOT / "configs" / "smoke.yaml"), f"output_dir={out}", "train.max_steps=8"]) == 0
    return out / "smoke"


def test_top_k_gives_raw_ids_in_score_order_and_can_exclude_seen(run_dir):
    frame = predict(run_dir, k=7, actors=[1, 5], actions=None, exclude_seen=True)
    assert frame.height == 14 and frame["actor"].unique().sort().to_list() == [1, 5]
    log = PreparedDataset.open(run_dir / "prepared").event_log()
    raw = log.events.with_columns(
        actor=pl.Series(log.actor_ids.to_raw(log.events["actor"].to_numpy())),
        target=pl.Series(log.target_ids.to_raw(log.events["target"].to_numpy())),
    )
    for actor in (1, 5):
        rows = frame.filter(pl.col("actor") == actor).sort("rank")
        assert rows["rank"].to_list() == list(range(1, 8))
        scores = rows["score"].to_numpy()
        assert (np.diff(scores) <= 0).all()
        seen = set(raw.filter(pl.col("actor") == actor)["target"].to_list())
        assert not seen & set(rows["target"].to_list())
    with_seen = predict(run_dir, k=50, actors=[1], actions=None, exclude_seen=False)
    seen_1 = set(raw.filter(pl.col("actor") == 1)["target"].to_list())
    assert seen_1 & set(with_seen["target"].to_list())  # repeat contacts are allowed by default


def test_a_request_reads_only_the_partitions_of_its_actors_and_their_contacts_and_ranks_as_a_whole_read_does(
    run_dir, monkeypatch
):
    """The actors' partitions hold their histories and the events that reached them; the
    contacts' own activity (`model.contact_activity`, on by default) lies in the contacts'
    partitions, read next, sent and received events."""
    everyone = predict(run_dir, k=5, actors=None, actions=None, exclude_seen=False)
    dataset = PreparedDataset.open(run_dir / "prepared")
    wanted = [1, 5, 77]
    read: list[tuple[str, list[int]]] = []
    real = PreparedDataset.read_events

    def recording(self, parts, folder="events"):
        read.append((folder, sorted(parts)))
        return real(self, parts, folder)

    monkeypatch.setattr(PreparedDataset, "read_events", recording)
    some = predict(run_dir, k=5, actors=wanted, actions=None, exclude_seen=False)
    index = dataset.id_maps()[0].to_index(wanted)
    expected_parts = sorted(set(partition_of(index, dataset.partitions).tolist()))
    assert read[:2] == [("events", expected_parts), ("incoming", expected_parts)]
    # Then only the contacts' partitions not read already.
    contacts = read[2][1]
    assert read[2:] == [("events", contacts), ("incoming", contacts)]
    assert contacts and not set(expected_parts) & set(contacts)
    assert len(expected_parts) + len(contacts) < dataset.partitions
    # The same top-k as when every partition is read: the request's time and default
    # action are the whole log's, not the partitions'. The scores within float rounding:
    # a batch of other queries takes other kernel paths on some CPUs (measured on an AMD
    # EPYC: 2e-6 apart; on the earlier machines identical).
    some = some.sort(["actor", "rank"])
    whole = everyone.filter(pl.col("actor").is_in(wanted)).sort(["actor", "rank"])
    assert some.select("actor", "rank", "target").equals(whole.select("actor", "rank", "target"))
    np.testing.assert_allclose(some["score"].to_numpy(), whole["score"].to_numpy(), rtol=1e-5)


def test_a_requests_contacts_activity_is_the_whole_logs_for_contacts_inside_and_outside_its_partitions(run_dir):
    """The contacts in the requested actors' own partitions are read from what the request
    already holds, the others from their partitions: every contact's activity is what the
    whole log gives, at any time."""
    from data.prepare import prepare_from_dataset

    config = load_config(run_dir / "config.yaml")
    dataset = PreparedDataset.open(run_dir / "prepared")
    whole = prepare_from_dataset(dataset, config.data)
    seqs = whole.seqs
    longest = int(np.argmax(seqs.lengths))
    actor = int(seqs.actor[longest])
    # A contact who is an actor too: its partition is read for the request.
    wrote_to = seqs.targets[seqs.offsets[longest] : seqs.offsets[longest + 1]]
    contact = int(next(t for t in wrote_to if t in set(seqs.actor.tolist()) and t != actor))
    parts = sorted(set(partition_of(np.array([actor, contact]), dataset.partitions).tolist()))
    request = prepare_from_dataset(dataset, config.data, parts=parts)
    sequence = np.flatnonzero(np.isin(request.seqs.actor, [actor, contact]))
    lookup = predict_module._contacts_activity(dataset, request, sequence, parts)
    incoming = whole.incoming_events("all")
    people = np.unique(np.concatenate(
        [seqs.targets[seqs.offsets[s] : seqs.offsets[s + 1]] for s in np.flatnonzero(np.isin(seqs.actor, [actor, contact]))]
        + [incoming.sources[incoming.offsets[a] : incoming.offsets[a + 1]] for a in (actor, contact)]
    ))
    inside = np.isin(partition_of(people, dataset.partitions), parts)
    assert inside.any() and (~inside).any()  # both sources are exercised
    rng = np.random.default_rng(0)
    asked = rng.choice(people, 2000)
    now = rng.integers(int(seqs.timestamps.min()), int(seqs.timestamps.max()) + 2, 2000)
    np.testing.assert_array_equal(lookup.index.features(asked, now), whole.activity("all").features(asked, now))


def test_next_action_file_and_odd_requests(run_dir, tmp_path):
    actions = tmp_path / "user_action_type.json"
    actions.write_text(json.dumps({"1": "<none>"}))
    actors = tmp_path / "actors.txt"
    actors.write_text("1\n424242\n")
    out = tmp_path / "p.parquet"
    assert predict_main(["--run", str(run_dir), "--actors", str(actors), "--actions", str(actions), "--out", str(out)]) == 0
    assert pl.read_parquet(out)["actor"].unique().to_list() == [1]  # the unknown actor is skipped
    assert predict(run_dir, k=3, actors=[], actions=None, exclude_seen=False).height == 0
    with pytest.raises(DataError, match="action type 'like', which the model never saw"):
        predict(run_dir, k=3, actors=[1], actions={"1": "like"}, exclude_seen=False)


class _RunsCode:
    """Pickles to a call of os.system: loading it unsafely would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _one_error_line(capsys) -> str:
    """The single `error: ...` line a user error prints on stderr."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_a_crafted_or_damaged_model_file_is_refused_in_one_line(run_dir, tmp_path, capsys):
    crafted = tmp_path / "run"
    crafted.mkdir()
    shutil.copy(run_dir / "config.yaml", crafted / "config.yaml")
    (crafted / "prepared").symlink_to(run_dir / "prepared")
    (crafted / "model").mkdir()
    rank_file = crafted / "model" / "rank-00000.pt"
    marker = tmp_path / "ran"
    real = (run_dir / "model" / "rank-00000.pt").read_bytes()
    args = ["--run", str(crafted), "--actors", str(tmp_path / "actors.txt"), "--out", str(tmp_path / "p.parquet")]
    (tmp_path / "actors.txt").write_text("1\n")
    for content in (
        pickle.dumps({"tensors": _RunsCode(marker), "pieces": []}),  # code in a plain pickle
        b"not a model" * 50,  # garbage
        real[: len(real) // 2],  # truncated
    ):
        rank_file.write_bytes(content)
        assert predict_main(args) == 2
        line = _one_error_line(capsys)
        assert str(rank_file) in line and "not a model file this project wrote (damaged or crafted" in line
        assert "python -m trainer.main" in line and "weights_only" not in line
        assert not marker.exists()
    # Loads, but is not laid out as an export, or not for this model.
    for saved, why in (
        ({"weights": torch.ones(2)}, "expected a dict with 'tensors'"),
        ({"tensors": {"w": torch.ones(2)}, "pieces": []}, "does not fit the model"),
    ):
        torch.save(saved, rank_file)
        assert predict_main(args) == 2
        line = _one_error_line(capsys)
        assert why in line and (str(rank_file) in line or str(crafted / "model") in line)
    assert not (tmp_path / "p.parquet").exists()
    assert torch.load(run_dir / "model" / "rank-00000.pt", weights_only=True)  # the real one loads


# ---- argument checks: each fails before any work, so none needs a trained run.


@pytest.fixture
def fake_run(tmp_path, monkeypatch) -> Path:
    """Just enough of a run directory to pass the --run check; predict() itself fails
    the test if reached, so every check below is shown to come before any work."""
    run = tmp_path / "run"
    (run / "prepared").mkdir(parents=True)
    config = load_config(ROOT / "configs" / "smoke.yaml")
    (run / "prepared" / "manifest.json").write_text(
        json.dumps({"schema_version": 1, "files": {}, "data_config": prepared_config(config.data)})
    )
    (run / "model").mkdir()
    shutil.copy(ROOT / "configs" / "smoke.yaml", run / "config.yaml")

    def no_work(*args, **kwargs):
        raise AssertionError("predict() ran before the arguments were checked")

    monkeypatch.setattr(predict_module, "predict", no_work)
    return run


def test_k_must_be_at_least_one(fake_run, tmp_path, capsys):
    for k in ("0", "-3", "abc"):
        assert predict_main(["--run", str(fake_run), "--k", k, "--out", str(tmp_path / "p.json")]) == 2
        assert "argument --k: expected an integer >= 1" in _one_error_line(capsys)
    assert predict_main(["--run", str(fake_run)]) == 2  # argparse's own complaints: one line too
    assert _one_error_line(capsys) == "error: the following arguments are required: --out"


def test_out_must_be_writable_before_any_work(fake_run, tmp_path, capsys):
    assert predict_main(["--run", str(fake_run), "--out", str(tmp_path / "missing" / "p.parquet")]) == 2
    assert _one_error_line(capsys) == f"error: --out: the folder {tmp_path / 'missing'} does not exist; create it first"
    assert predict_main(["--run", str(fake_run), "--out", str(tmp_path)]) == 2
    assert _one_error_line(capsys).startswith(f"error: --out: {tmp_path} is a directory")


def test_run_must_be_a_run_directory(fake_run, tmp_path, capsys):
    out = str(tmp_path / "p.json")
    assert predict_main(["--run", str(tmp_path / "nowhere"), "--out", out]) == 2
    assert _one_error_line(capsys).startswith(f"error: --run: {tmp_path / 'nowhere'} is not a directory")
    assert predict_main(["--run", str(tmp_path), "--out", out]) == 2  # a folder, but not a run
    assert _one_error_line(capsys).startswith(f"error: --run: {tmp_path} is not a run directory (no config.yaml)")
    shutil.rmtree(fake_run / "model")
    assert predict_main(["--run", str(fake_run), "--out", out]) == 2
    assert "no exported model (model/)" in _one_error_line(capsys)


def test_actors_file_errors_name_the_file_and_line(fake_run, tmp_path, capsys):
    actors = tmp_path / "actors.txt"
    args = ["--run", str(fake_run), "--actors", str(actors), "--out", str(tmp_path / "p.json")]
    assert predict_main(args) == 2
    assert _one_error_line(capsys).startswith(f"error: --actors: {actors} does not exist")
    actors.write_text("1\n\n abc \n5\n")  # line 3: a blank line still counts
    assert predict_main(args) == 2
    assert _one_error_line(capsys).startswith(f"error: {actors}:3: expected an integer actor ID, got 'abc'")


def test_actions_must_be_a_json_object(fake_run, tmp_path, capsys):
    actions = tmp_path / "actions.json"
    args = ["--run", str(fake_run), "--actions", str(actions), "--out", str(tmp_path / "p.json")]
    for content in (None, "[1, 2]", "{1: 'like'}", '{"1": ["like"]}'):
        if content is not None:
            actions.write_text(content)
        assert predict_main(args) == 2
        line = _one_error_line(capsys)
        assert line.startswith(f"error: --actions: {actions}") and "expected a JSON object {actor ID: action type}" in line


def test_checked_arguments_reach_predict_typed_as_the_log(fake_run, tmp_path, monkeypatch):
    got = {}

    def fake_predict(run_dir, k, actors, actions, exclude_seen):
        got.update(k=k, actors=actors, actions=actions)
        return pl.DataFrame(schema={"actor": pl.Int64, "rank": pl.Int64, "target": pl.Int64, "score": pl.Float32})

    monkeypatch.setattr(predict_module, "predict", fake_predict)
    (tmp_path / "actors.txt").write_text(" 1\r\n\n5\n")
    (tmp_path / "actions.json").write_text('{"1": "<none>", "5": 2}')
    args = ["--run", str(fake_run), "--k", "3", "--actors", str(tmp_path / "actors.txt"), "--out", str(tmp_path / "p.json")]
    assert predict_main([*args, "--actions", str(tmp_path / "actions.json")]) == 0
    assert got == {"k": 3, "actors": [1, 5], "actions": {"1": "<none>", "5": 2}}
    assert json.loads((tmp_path / "p.json").read_text()) == []
    # A log of string IDs takes every line as it is.
    (fake_run / "config.yaml").write_text((fake_run / "config.yaml").read_text().replace("data:\n", "data:\n  id_type: str\n"))
    manifest = fake_run / "prepared" / "manifest.json"
    values = json.loads(manifest.read_text())
    values["data_config"]["id_type"] = "str"  # the dataset prepared for that config
    manifest.write_text(json.dumps(values))
    (tmp_path / "actors.txt").write_text("abc\n1\n")
    assert predict_main(args) == 0 and got["actors"] == ["abc", "1"]


def test_a_prepared_dataset_rebuilt_from_other_data_is_refused(run_dir, tmp_path, capsys):
    """A shared prepared dataset rebuilt for another data config (or log) would map the
    model's indices to other IDs: refused in one line before any work."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    manifest = copy / "prepared" / "manifest.json"
    values = json.loads(manifest.read_text())
    values["data_config"]["active_since_fraction"] = 0.5
    manifest.write_text(json.dumps(values))
    assert predict_main(["--run", str(copy), "--k", "3", "--out", str(tmp_path / "p.json")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "prepared from other data than the model was trained on (data.active_since_fraction)" in line
    values["data_config"]["active_since_fraction"] = 0.0
    values["counts"]["events"] += 1
    manifest.write_text(json.dumps(values))
    assert predict_main(["--run", str(copy), "--k", "3", "--out", str(tmp_path / "p.json")]) == 2
    assert "events 59,835 -> 59836" in capsys.readouterr().err


def test_a_contact_offset_chosen_on_validation_is_reported_exported_and_served(tmp_path, monkeypatch):
    args = ["--config", str(ROOT / "configs" / "smoke.yaml"), f"output_dir={tmp_path}", "train.max_steps=8",
            "model.contact_offset_on_validation=true"]
    assert main(args) == 0
    run = tmp_path / "smoke"
    reported = json.loads((run / "results.json").read_text())["contact_offset"]
    tried = {float(offset): value for offset, value in reported["valid_ndcg@10"].items()}
    assert set(tried) == set(CONTACT_OFFSETS)
    best = next(offset for offset in CONTACT_OFFSETS if tried[offset] == max(tried.values()))
    assert reported["chosen"] == best
    assert load_exported(run)["repeat.contact_offset"].item() == best
    built = []
    real_build = predict_module.build_model
    monkeypatch.setattr(predict_module, "build_model", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    predict(run, k=3, actors=[1], actions=None, exclude_seen=False)
    assert built and built[0].repeat.contact_offset.item() == best  # predict scores with it


def test_a_repeat_explore_run_logs_the_order_loss_and_predict_serves_the_model_it_exported(tmp_path, monkeypatch):
    args = ["--config", str(ROOT / "configs" / "smoke.yaml"), f"output_dir={tmp_path}", "train.max_steps=8",
            "train.log_every_steps=1", "model.repeat_explore=true"]
    assert main(args) == 0
    run = tmp_path / "smoke"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    order_losses = [scalar.value for scalar in events.Scalars("loss/contact_order")]
    assert len(order_losses) == 8 and all(np.isfinite(order_losses)) and max(order_losses) > 0
    exported = load_exported(run)
    assert any(key.startswith("repeat.propensity.") for key in exported)
    built = []
    real_build = predict_module.build_model
    monkeypatch.setattr(predict_module, "build_model", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    frame = predict(run, k=3, actors=[1], actions=None, exclude_seen=False)
    assert frame.height == 3 and np.isfinite(frame["score"].to_numpy()).all()
    served = built[0].state_dict()
    assert all(torch.equal(served[key], value) for key, value in exported.items() if key.startswith("repeat."))



def test_a_run_exported_before_the_activity_default_is_refused_in_one_line_then_served_as_trained(
    tmp_path, capsys
):
    """A shared-ID run trained before `model.contact_activity` existed has no such key in
    its config.yaml: predict builds the wider re-scorer and refuses the export in one line;
    the key set to false (what the README says to do) serves it."""
    args = ["--config", str(ROOT / "configs" / "smoke.yaml"), f"output_dir={tmp_path}", "train.max_steps=8",
            "model.contact_activity=false"]
    assert main(args) == 0
    run = tmp_path / "smoke"
    config_file = run / "config.yaml"
    written = config_file.read_text()
    assert "contact_activity: false" in written
    older = "".join(line for line in written.splitlines(keepends=True) if "contact_activity:" not in line)
    config_file.write_text(older)  # as a run of an older version wrote it
    capsys.readouterr()  # the training's own output
    out = tmp_path / "p.json"
    assert predict_main(["--run", str(run), "--k", "3", "--actors", str(_actors_file(tmp_path)), "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "wrong shape of ['repeat.mlp.0.weight']" in error
    config_file.write_text(written)
    assert predict_main(["--run", str(run), "--k", "3", "--actors", str(_actors_file(tmp_path)), "--out", str(out)]) == 0


def _actors_file(tmp_path: Path) -> Path:
    path = tmp_path / "actors.txt"
    path.write_text("1\n5\n")
    return path
