"""The README shows the quality, ablation and derived-log tables exactly as the benchmarks
last wrote them."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_quality_table_is_the_generated_one():
    generated = (ROOT / "bench" / "results" / "quality.md").read_text()
    table = "\n".join(line for line in generated.splitlines() if line.startswith("| "))
    assert table, "quality.md has no table"
    readme = (ROOT / "README.md").read_text()
    assert table in readme, "README's Quality table differs from bench/results/quality.md: paste it again"
    verdicts = [line for line in generated.splitlines() if line.startswith("- ")]
    assert verdicts and all(line in readme for line in verdicts)


def test_the_readme_shows_the_generated_table_of_logs_it_was_not_tuned_on():
    generated = (ROOT / "bench" / "results" / "generalisation.md").read_text()
    table = "\n".join(line for line in generated.splitlines() if line.startswith("| "))
    assert table, "generalisation.md has no table"
    assert table in (ROOT / "README.md").read_text(), (
        "README's table of derived logs differs from bench/results/generalisation.md: paste it again"
    )


def _rows(lines: list[str]) -> dict[str, list[str]]:
    """{variant: its cells after the change column} of a markdown table's body rows."""
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and cells[0] not in ("variant", "") and not set(cells[0]) <= set("-: "):
            rows[cells[0]] = cells[2:]
    return rows


def _first_table(lines: list[str]) -> dict[str, list[str]]:
    # Any line opening with "|" belongs to the table: generated files write the separator
    # row as "|---|", the README as "| --- |".
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return _rows(lines[start:end])


def _assert_readme_table_matches(generated_file: str, readme_marker: str) -> None:
    """The README's first table after `readme_marker` shows the first table of
    bench/results/`generated_file` cell for cell (the README's change column says in
    words what the file lists as overrides)."""
    generated = (ROOT / "bench" / "results" / generated_file).read_text().split("\n\n")
    expected = _first_table(next(block for block in generated if block.startswith("| variant")).splitlines())
    section = (ROOT / "README.md").read_text().split(readme_marker, 1)[1].splitlines()
    shown = _first_table(section)
    assert expected and set(shown) == set(expected), f"README's table after {readme_marker!r} lists other variants than {generated_file}"
    for variant, cells in expected.items():
        assert shown[variant] == cells, f"README's row {variant!r} after {readme_marker!r} differs from {generated_file}"


def test_the_readme_ablation_table_shows_the_generated_figures():
    _assert_readme_table_matches("ablation.md", "### Ablation")


@pytest.mark.parametrize(
    "frozen, marker",
    [
        ("ablation_default_2026-12-05_offset.md", "#### At the default of 2026-12-05, before the contacts' activity"),
        ("ablation_default_2026-12-04.md", "#### At the default of 2026-12-04"),
        ("ablation_default_2026-12-03.md", "#### At the default before 2026-12-04"),
    ],
)
def test_the_readme_shows_each_earlier_defaults_ablation_as_frozen(frozen, marker):
    """The ablation at each earlier default, frozen when the default changed."""
    _assert_readme_table_matches(frozen, marker)
