"""The README shows the quality table exactly as bench/quality.py last wrote it."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_quality_table_is_the_generated_one():
    generated = (ROOT / "bench" / "results" / "quality.md").read_text()
    table = "\n".join(line for line in generated.splitlines() if line.startswith("| "))
    assert table, "quality.md has no table"
    readme = (ROOT / "README.md").read_text()
    assert table in readme, "README's Quality table differs from bench/results/quality.md: paste it again"
    verdicts = [line for line in generated.splitlines() if line.startswith("- ")]
    assert verdicts and all(line in readme for line in verdicts)


def _rows(lines: list[str]) -> dict[str, list[str]]:
    """{variant: its cells after the change column} of a markdown table's body rows."""
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 2 and cells[0] not in ("variant", "") and not set(cells[0]) <= set("-: "):
            rows[cells[0]] = cells[2:]
    return rows


def test_the_readme_ablation_table_shows_the_generated_figures():
    """Cell for cell (the README's change column says in words what ablation.md's lists
    as overrides)."""
    generated = (ROOT / "bench" / "results" / "ablation.md").read_text().split("\n\n")
    first_table = next(block for block in generated if block.startswith("| variant"))
    expected = _rows(first_table.splitlines())
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Ablation", 1)[1].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("| "))
    end = next((i for i in range(start, len(section)) if not section[i].startswith("| ")), len(section))
    shown = _rows(section[start:end])  # the section's first table
    assert expected and set(shown) == set(expected), "README's Ablation table lists other variants than ablation.md"
    for variant, cells in expected.items():
        assert shown[variant] == cells, f"README's Ablation row {variant!r} differs from bench/results/ablation.md"
