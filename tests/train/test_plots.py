"""`rlhfkit plot`'s reading and drawing: lines that are not metrics records, runs that log different metrics."""

import json

from rlhfkit.train.plots import plot_runs, read_curves


def _metrics(folder, records, tail=""):
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return folder


def test_lines_that_are_not_records_are_left_out_and_named(tmp_path, capsys):
    run = _metrics(tmp_path / "a", [{"step": 1, "train/loss": 2.0}, {"train/loss": 9.0}, {"step": 2, "train/loss": 1.5}],
                   tail='{"step": 3, "train/lo')  # a kill cut the last line short
    assert read_curves(run) == {"train/loss": ([1, 2], [2.0, 1.5])}
    assert "line(s) 2, 4 are not metrics records" in capsys.readouterr().err


def test_plot_of_runs_without_numbers_is_a_one_line_error(tmp_path, capsys):
    from rlhfkit.cli.main import main

    run = _metrics(tmp_path / "empty", [])
    assert main(["plot", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "no metrics to plot" in capsys.readouterr().err
    full = _metrics(tmp_path / "full", [{"step": 1, "train/loss": 2.0}])
    assert main(["plot", str(full), "--out", str(full / "metrics.jsonl")]) == 2  # a file where the folder goes
    assert "metrics.jsonl is a file; the plots go in a folder" in capsys.readouterr().err


def test_a_run_keeps_its_colour_in_every_panel_and_the_legend_names_every_run(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    sft = _metrics(tmp_path / "sft", [{"step": s, "eval/accuracy": 0.1 * s} for s in (1, 2)])
    rm = _metrics(tmp_path / "rm", [{"step": s, "eval/pairwise_accuracy": 0.5, "eval/accuracy": 0.2} for s in (1, 2)])
    dpo = _metrics(tmp_path / "dpo", [{"step": s, "eval/pairwise_accuracy": 0.7} for s in (1, 2)])
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_runs([sft, rm, dpo], tmp_path / "out")
    (fig,) = figures  # the eval figure: two panels
    colours = {line.get_label(): line.get_color() for ax in fig.axes for line in ax.lines}
    per_panel = [{line.get_label(): line.get_color() for line in ax.lines} for ax in fig.axes if ax.lines]
    assert colours == {"sft": "C0", "rm": "C1", "dpo": "C2"}
    assert per_panel == [{"sft": "C0", "rm": "C1"}, {"rm": "C1", "dpo": "C2"}]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["sft", "rm", "dpo"]
