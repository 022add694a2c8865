"""README.md and docs/: every results table is what benchmarks/tables.py renders from the committed records,
the front page stays a front page, and every link points at a file the repository has.

Pure file reads (no torch, no training): the whole file runs in well under a second.
"""
import re
from pathlib import Path

import pytest

from conftest import load_module

ROOT = Path(__file__).resolve().parent.parent

tables = load_module("fastmnist_doc_tables", ROOT / "benchmarks" / "tables.py")
README = (ROOT / "README.md").read_text()


def test_every_table_is_what_the_records_render():
    stale = tables.stale()
    if stale:
        pytest.fail("tables differ from benchmarks/results/ in " + ", ".join(str(p.relative_to(ROOT)) for p in stale)
                    + ": run `python benchmarks/tables.py` (a figure is never typed; `--check` shows the diff)",
                    pytrace=False)


def test_a_figure_typed_by_hand_is_caught():
    """The check above must see an edited figure: change one digit of a rendered table and compare."""
    rendered = tables.rendered(README, {})
    shown = f"**{tables.pct(min(tables.finals(tables.seed_set(tables.SEEDS)['default'])))}**"  # default's minimum
    edited = rendered.replace(shown, "**00.00%**", 1)
    assert edited != rendered, f"the README's summary no longer shows default's minimum {shown}"
    assert tables.rendered(edited, {}) == rendered  # rendering puts the recorded figure back


def test_every_table_is_used_and_every_marker_known():
    assert tables.used_tables() == set(tables.TABLES)


def test_readme_is_a_front_page():
    lines = README.splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; depth belongs in docs/"
    first_screen = "\n".join(lines[:45])
    assert "pip install --no-build-isolation -e '.[test,plot,export,serve]' && fastmnist train" in first_screen
    assert ". .venv/bin/activate && python -m pytest tests -q" in first_screen
    assert "<!-- table:summary -->" in first_screen and "<!-- /table -->" in first_screen


@pytest.mark.parametrize("path", tables.documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_at_files_the_repository_has(path):
    text = path.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    missing = [t for t in targets if "://" not in t and not (path.parent / t).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to files that do not exist: {missing}"


def anchors(path: Path) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped but - and _, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", path.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("path", tables.documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_to_a_heading_find_it(path):
    links = re.findall(r"\]\(([^)\s#]*)#([^)\s]+)\)", path.read_text())
    broken = [f"{t}#{a}" for t, a in links if "://" not in t and a not in anchors(path.parent / t if t else path)]
    assert not broken, f"{path.relative_to(ROOT)} links to headings that do not exist: {broken}"


@pytest.mark.parametrize("path", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_each_doc_opens_with_what_it_is_for(path):
    """A title, then within the first paragraphs a sentence saying what the page is for."""
    head = path.read_text()[:600]
    assert head.startswith("# ")
    assert "this page" in head.lower() or "what this page is for" in head.lower(), head


def test_the_recorded_recipes_are_the_recipes_the_code_trains():
    """docs/recipe.md renders each recipe from the seed runs; they must be fastmnist/recipes.py's."""
    recipes = load_module("fastmnist_doc_recipes", ROOT / "fastmnist" / "recipes.py").RECIPES
    for model, runs in tables.seed_set(tables.SEEDS).items():
        for run in runs:
            recorded = {k: run["config"][k] for k in recipes[model]}
            assert recorded == recipes[model], f"{run['folder']} seed {run['config']['seed']} is not today's recipe"
