import json
import sys

import pytest
import torch

from conftest import one_line_error, run_cli
from fastmnist.cli import main
from fastmnist.plots import MAX_MISTAKES_SHOWN
from fastmnist.report import per_class_table, summarize


def test_summary_of_known_predictions():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    predicted = torch.tensor([0, 2, 1, 7, 7, 2])
    probs = torch.full((6, 10), 0.01)
    probs[torch.arange(6), predicted] = torch.tensor([0.9, 0.6, 0.9, 0.7, 0.95, 0.9])
    s = summarize(labels, probs)
    assert (s["test_size"], s["correct"]) == (6, 3)
    assert s["per_class"][1] == {"digit": 1, "correct": 1, "total": 3, "accuracy": 1 / 3,
                                 "most_confused_with": 7, "most_confused_count": 2}
    assert s["per_class"][2]["most_confused_with"] is None and s["per_class"][5]["accuracy"] is None
    assert s["confusion"][1][7] == 2 and s["confusion"][0][2] == 1
    assert [m["index"] for m in s["mistakes"]] == [4, 3, 1]  # most confident first
    assert s["mistakes"][0] == {"index": 4, "true": 1, "predicted": 7, "probability": 0.95}
    table = per_class_table(s)
    assert len(table.splitlines()) == 11 and "7 (2x)" in table


@pytest.fixture(scope="module")
def report(untrained_model, mnist_dir, tmp_path_factory):
    """`fastmnist eval --report` on random weights: thousands of mistakes, no training."""
    out = tmp_path_factory.mktemp("report") / "new" / "report"  # a folder that does not exist yet
    result = run_cli("eval", "--checkpoint", str(untrained_model), "--data-dir", mnist_dir, "--report", str(out))
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def test_per_class_counts_add_up_to_the_test_set(report):
    out, stdout = report
    r = json.loads((out / "report.json").read_text())
    assert sum(c["total"] for c in r["per_class"]) == r["test_size"] == 10000
    assert sum(r["confusion"][d][d] for d in range(10)) == r["correct"] == sum(c["correct"] for c in r["per_class"])
    assert sum(map(sum, r["confusion"])) == r["test_size"]
    assert len(r["mistakes"]) == r["test_size"] - r["correct"]
    # The same evaluation as the accuracy line eval has always printed.
    assert f"test accuracy {100 * r['correct'] / r['test_size']:.2f}%" in stdout
    assert "digit  correct/total" in stdout


def test_report_writes_json_and_plots(report):
    from PIL import Image

    out, stdout = report
    r = json.loads((out / "report.json").read_text())
    assert {"accuracy", "test_size", "correct", "per_class", "confusion", "mistakes"} <= set(r)
    assert set(r["mistakes"][0]) == {"index", "true", "predicted", "probability"}
    probs = [m["probability"] for m in r["mistakes"]]
    assert probs == sorted(probs, reverse=True)
    for name in ("confusion.png", "mistakes.png"):
        with Image.open(out / name) as image:
            image.verify()
    assert len(r["mistakes"]) > MAX_MISTAKES_SHOWN  # so the grid is capped; its title says by how many
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "mistakes.png", "report.json"]


def test_report_without_matplotlib_writes_the_json_and_says_how_to_get_the_plots(
        untrained_model, mnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["eval", "--checkpoint", str(untrained_model), "--data-dir", mnist_dir, "--report", str(tmp_path)]) == 0
    assert "pip install matplotlib" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_unwritable_report_folder_is_one_line(untrained_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = one_line_error(run_cli("eval", "--checkpoint", str(untrained_model), "--report", str(blocker / "report")))
    assert "cannot write the report to --report" in line


def test_eval_help_mentions_report(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    assert exc.value.code == 0 and "--report" in capsys.readouterr().out
