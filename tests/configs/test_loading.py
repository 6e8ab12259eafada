"""Config loading: unknown keys, wrong types, out-of-range values, overrides."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from configs.loading import ConfigError, load_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def test_every_shipped_config_loads():
    for path in CONFIG_DIR.glob("*.yaml"):
        assert load_config(path).name


def _load(write, text, overrides=()):
    return load_config(write("c.yaml", text), list(overrides))


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("name: x\ndata: {path: a, max_lne: 3}\n", [], r"unknown config key 'data\.max_lne'; did you mean 'data\.max_len'"),
        ("name: x\ndata: {path: a}\nloadr: {}\n", [], r"unknown config key 'loadr'; did you mean 'loader'"),
        ("name: x\ndata: {path: a, max_len: ten}\n", [], r"data\.max_len: expected int, got 'ten'"),
        ("name: x\ndata: {path: a, max_len: 1.5}\n", [], r"data\.max_len: expected int"),
        ("name: x\ndata: {path: a, format: xls}\n", [], r"data\.format: expected one of 'auto' \| 'snap'"),
        ("name: x\ndata: {path: a}\n", ["loader.batch_size=0"], r"loader\.batch_size: expected >= 1, got 0"),
        ("name: x\n", [], r"missing required config key\(s\): data"),
        ("name: x\ndata: {}\n", [], r"missing required config key\(s\): data\.path"),
        ("[1, 2]\n", [], r"expected a mapping"),
        ("name: x\ndata: {path: a}\n", ["nonsense"], r"expected key=value"),
        ("name: ../x\ndata: {path: a}\n", [], r"name: expected a plain run name"),
        ("name: x\ndata: {path: a, format: snp}\n", [], r"data\.format: expected one of .*; did you mean 'snap'\?"),
        ("name: x\ndata: {path: a}\ndistributed: {sharding: {target_idz: row_wise}}\n", [],
         r"distributed\.sharding\.target_idz: unknown table; did you mean 'target_ids'\?"),
        ("name: x\ndata: {path: a}\ndistributed: {sharding: {target_ids: rowwise}}\n", [],
         r"distributed\.sharding\.target_ids: expected one of .*; did you mean 'row_wise'\?"),
        ("name: x\ndata: {path: a, header: false, timestamp_column: t}\n", [],
         r"c\.yaml: data\.header: without a header the columns are positional, so data\.timestamp_column cannot"),
        ("name: x\ndata: {path: a, header: false, format: parquet}\n", [], r"data\.header: only csv logs"),
        ("name: x\ndata: {path: a}\nmodel: {repeat_scoring: false, repeat_explore: true}\n", [],
         r"model\.repeat_explore: needs model\.repeat_scoring"),
    ],
)
def test_bad_configs_fail_with_the_key_named(write, text, overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        _load(write, text, overrides)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("loader.batch_sise=3", r"^override 'loader.batch_sise=3': unknown config key 'loader\.batch_sise'; "
                                r"did you mean 'loader\.batch_size'\?"),
        ("lodaer.batch_size=3", r"^override 'lodaer.batch_size=3': unknown config key 'lodaer'; did you mean 'loader'"),
        ("loader.batch_size=many", r"^override 'loader.batch_size=many': loader\.batch_size: expected int, got 'many'"),
        ("loader.batch_size=0", r"^override 'loader.batch_size=0': loader\.batch_size: expected >= 1, got 0"),
        ("model.num_heads=3", r"^override 'model.num_heads=3': model\.embedding_dim \(64\) must be divisible"),
        ("loss.hard_negatives.enabld=true", r"^override .*: unknown config key 'loss\.hard_negatives\.enabld'; "
                                            r"did you mean 'loss\.hard_negatives\.enabled'"),
    ],
)
def test_a_bad_override_is_named_as_the_override_not_the_file(write, override, expected):
    with pytest.raises(ConfigError, match=expected):
        _load(write, "name: x\ndata: {path: a}\n", [override])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("name=...", r"expected the node content, but found '<document end>'"),
        ("data.path=[unclosed", r"expected ',' or '\]', but got '<stream end>' \(while parsing a flow sequence\)"),
        ("name=*alias", r"found undefined alias 'alias'"),
        ("name=!!python/object/apply:os.system [ls]", r"could not determine a constructor .*no tags that build objects"),
    ],
)
def test_an_override_that_is_not_yaml_is_one_line_naming_the_override(write, override, expected):
    with pytest.raises(ConfigError) as error:
        _load(write, "name: x\ndata: {path: a}\n", [override])
    message = str(error.value)
    assert "\n" not in message and re.search(expected, message)
    assert message.startswith(f"override {override!r}: the value is not valid YAML: ") and "quote it" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: x\ndata: {path: [a}\n", r"c\.yaml: not valid YAML: line 2, column 16: expected ',' or '\]'"),
        ("name: !!python/object/apply:os.system [ls]\ndata: {path: a}\n", r"c\.yaml: not valid YAML: line 1, column 7: "),
        ("name: x\n  data: 3\n", r"c\.yaml: not valid YAML: line 2, column 7: mapping values are not allowed here"),
        (b"name: \xff\n", r"c\.yaml: not UTF-8 text"),
    ],
)
def test_a_config_file_that_is_not_yaml_is_one_line_naming_the_file(write, text, expected):
    with pytest.raises(ConfigError) as error:
        load_config(write("c.yaml", text))
    assert "\n" not in str(error.value) and re.search(expected, str(error.value))


def test_a_bad_key_in_the_file_is_named_with_the_file(write):
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'loader\.batch_sise'"):
        _load(write, "name: x\ndata: {path: a}\nloader: {batch_sise: 3}\n", ["seed=1"])


def test_every_schema_field_is_documented():
    """Every field of every config dataclass has a docstring right below it (the schema is
    the reference users read: README points there)."""
    tree = ast.parse((CONFIG_DIR / "schema.py").read_text())
    undocumented = []
    for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        body = cls.body
        for i, statement in enumerate(body):
            if isinstance(statement, ast.AnnAssign):
                following = body[i + 1] if i + 1 < len(body) else None
                documented = (
                    isinstance(following, ast.Expr)
                    and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)
                )
                if not documented:
                    undocumented.append(f"{cls.name}.{statement.target.id}")
    assert not undocumented


def test_overrides_are_typed_and_nested(write):
    config = _load(write, "name: x\ndata: {path: a}\n", ["loader.batch_size=7", "data.shared_id_space=true", "seed=3"])
    assert config.loader.batch_size == 7 and config.data.shared_id_space is True and config.seed == 3


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")


def test_exponent_floats_without_a_dot_are_numbers(write):
    assert _load(write, "name: x\ndata: {path: a}\noptim: {lr: 1e-4}\n").optim.lr == 1e-4


def test_cross_section_rules_are_checked_before_any_work(write):
    base = "name: x\ndata: {path: a}\n"
    with pytest.raises(ConfigError, match="temporal_weight > 0 needs a causal encoder"):
        _load(write, base + "model: {encoder: transformer}\n")
    assert _load(write, base + "model: {encoder: transformer}\nloss: {temporal_weight: 0}\n").model.encoder == "transformer"
    with pytest.raises(ConfigError, match="larger than the negatives available"):
        _load(write, base + "loss: {hard_negatives: {enabled: true, topk_start: 500}}\n")
    with pytest.raises(ConfigError, match="loss.temperature: expected > 0"):
        _load(write, base + "loss: {temperature: -1}\n")


def test_yaml_dates_are_iso_text_and_a_date_that_is_no_date_is_one_line(tmp_path):
    config = load_config(CONFIG_DIR / "smoke.yaml", ["data.active_since_date=2004-06-01"])
    assert config.data.active_since_date == "2004-06-01"  # unquoted YAML reads a date
    with pytest.raises(ConfigError, match=r"override 'train.max_steps=2024-02-30'.*day is out of range"):
        load_config(CONFIG_DIR / "smoke.yaml", ["train.max_steps=2024-02-30"])
    with pytest.raises(ConfigError, match=r"data.active_since_date: expected an ISO date like 2004-06-01"):
        load_config(CONFIG_DIR / "smoke.yaml", ["data.active_since_date=June 2004"])
