"""notebooks/tradeoff.ipynb runs end to end (nbclient) on a tiny results folder and on an empty one."""
import os

import pytest

from test_analysis import cyclic_rows, standard, write_run

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "tradeoff.ipynb")


def execute(runs_dir, monkeypatch):
    """Run every cell with TRADEOFF_RUNS=runs_dir; returns the executed notebook's text and image outputs."""
    monkeypatch.setenv("TRADEOFF_RUNS", str(runs_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in outputs)
    return text, sum("image/png" in o.get("data", {}) for o in outputs)


def test_notebook_draws_a_curve_and_a_gap_table(tmp_path, monkeypatch):
    for seed in (0, 1):
        standard(tmp_path, [], [(2, 80 + seed), (4, 85), (8, 90)], seed=seed)
        write_run(tmp_path, f"cyc_s{seed}", "cyclic", [], cyclic_rows([79, 86, 89], [2, 4, 8]), seed)
    text, images = execute(tmp_path, monkeypatch)
    assert f"8 finished runs, 12 curve points in {tmp_path}" in text
    assert images == 1
    baseline = [line for line in text.splitlines() if line.startswith("baseline ")]
    assert len(baseline) == 1 and "-0.50" in baseline[0] and "[" in baseline[0]  # the gap with its CI


def test_notebook_draws_nothing_from_unfinished_runs(tmp_path, monkeypatch):
    """Runs still training (no `done`) are not drawn: their last rows are no curve point of a finished run."""
    standard(tmp_path, [], [(2, 80), (4, 85)], done=False)
    write_run(tmp_path, "cyc_s0", "cyclic", [], cyclic_rows([79, 86, 89], [2, 4, 8]), 0, done=False)
    text, images = execute(tmp_path, monkeypatch)
    assert f"no finished runs in {tmp_path}: nothing to draw" in text and images == 0
    (tmp_path / "cyc_s0" / "done").touch()  # one finished: it is found
    text, images = execute(tmp_path, monkeypatch)
    assert f"1 finished runs, 3 curve points in {tmp_path}" in text
