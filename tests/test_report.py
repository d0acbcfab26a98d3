"""``python -m analysis report``: one command from a sweep directory to tables, figures and correlations."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPACE = """
from search_spaces.base import SearchSpace

SPACE = SearchSpace(
    name="report_test",
    description="SAM max vs OBF over rho, and one point that fails at run time",
    base={"dataset": "digits", "epochs": 2, "batch_size": 64, "train_eval_size": 64, "lr": 0.05, "method": "sam"},
    grid={"rho": [0.02, 0.2], "perturbation": ["max", "obf"], "train_split": ["train[:320]", "train[:8]"]},
    max_concurrent=2,
)
"""


def _run(args, cwd, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    (tmp / "space.py").write_text(SPACE)
    proc = _run([str(ROOT / "run_sweep.py"), "--space", str(tmp / "space.py"), "--storage", str(tmp), "--name", "r"], tmp, 400)
    assert "failed" in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    return tmp / "r"


@pytest.mark.ray
@pytest.mark.slow
def test_report_writes_a_page_whose_links_all_resolve_and_names_the_failed_trials(sweep):
    proc = _run(["-m", "analysis", "report", str(sweep)], sweep.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 trials: 4 finished, 4 failed, 0 unfinished" in proc.stdout
    index = sweep / "report" / "index.html"
    assert f"report: {index}" in proc.stdout
    page = index.read_text()
    links = re.findall(r'(?:href|src)="([^"#]+)"', page) + re.findall(r"href='([^'#]+)'", page)
    assert len(links) > 10
    for link in links:
        assert (index.parent / link).is_file(), f"broken link {link}"
    pngs = [index.parent / link for link in links if link.endswith(".png")]
    assert {p.stem for p in pngs} >= {"val_top1_vs_rho", "gen_gap_vs_rho", "training_curves", "correlation_heatmap"}
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert page.count("failed <code>") == 4 and "fewer than one update" in page
    # The tables are inline and on disk; the settings come from sweep.json.
    assert "SAM" in page and "OBF" in page and "report_test" in page
    assert "\\toprule" in (index.parent / "accuracy.tex").read_text()
    assert "Rank correlation of each measure" in page and "tau" in (index.parent / "correlation.md").read_text().lower()
    assert "| SAM |" in (index.parent / "accuracy.md").read_text()


def test_a_path_that_is_not_a_sweep_exits_2_with_one_message(tmp_path):
    proc = _run(["-m", "analysis", "report", str(tmp_path)], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "No sweep at" in proc.stderr
    assert not (tmp_path / "report").exists()


NOTEBOOKS = ROOT / "analysis" / "notebooks"


def _execute(name: str, parameters: str, cwd: Path):
    import nbclient
    import nbformat

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: exactly one cell tagged 'parameters'"
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(parameters))  # what papermill injects
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    html_out = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    return images, html_out


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebooks_are_committed_without_outputs(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.ray
@pytest.mark.slow
def test_reproduce_tables_notebook_runs_top_to_bottom_on_a_sweep(sweep, tmp_path):
    images, html_out = _execute("reproduce_tables.ipynb", f"sweep_dir = {str(sweep)!r}", tmp_path)
    assert len(images) >= 3  # accuracy and gen_gap vs rho, training curves
    assert "SAM" in html_out and "OBF" in html_out and "±" in html_out


@pytest.mark.ray
@pytest.mark.slow
def test_forgetting_vs_sharpness_notebook_measures_and_correlates(sweep, tmp_path):
    params = f"sweep_dir = {str(sweep)!r}\n"
    params += 'measures = ["hessian_top", "worst_case_linf_adaptive"]\nrho_eval = [0.002]\ndata = "train[:128]"'
    images, html_out = _execute("forgetting_vs_sharpness.ipynb", params, tmp_path)
    assert len(images) >= 3  # the heat map and one scatter per measure
    assert "hessian_top" in html_out and "worst_case_linf_adaptive" in html_out
    assert (sweep / "measures").is_dir()


STUDY_SPACE = """
from search_spaces.base import SearchSpace

SPACE = SearchSpace(
    name="study_test",
    description="a shrunk m_sharpness_study",
    base={"dataset": "digits_spurious", "eval_sets": [["digits_spurious", "validation_aligned"]], "epochs": 1,
          "batch_size": 64, "lr": 0.05, "method": "sam", "train_split": "train[:320]", "train_eval_size": 64},
    grid={"perturbation": ["max", "obf"], "sharpness_m": [16, 64], "seed": [0]},
    max_concurrent=2,
)
"""


@pytest.mark.ray
@pytest.mark.slow
def test_make_study_runs_measures_and_answers_each_claim(tmp_path):
    (tmp_path / "space.py").write_text(STUDY_SPACE)
    variables = [f"STUDY_SPACE={tmp_path / 'space.py'}", f"STUDY_STORAGE={tmp_path}", "STUDY_NAME=s", "STUDY_DATA=train[:128]"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["make", "-C", str(ROOT), "study", *variables], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "is illegal" not in proc.stdout + proc.stderr  # TensorBoard's tag renaming stays in the sweep's log
    page = (tmp_path / "s" / "report" / "index.html").read_text()
    assert "The paper&#x27;s claims, measured" in page or "The paper's claims, measured" in page
    import pandas as pd

    found = pd.read_csv(tmp_path / "s" / "report" / "claims.csv")
    assert {"1. OBF vs max", "2. smaller m generalizes better"} <= set(found["claim"])
    assert found["verdict"].notna().all() and (found["n"] > 0).any()
    side = pd.read_csv(tmp_path / "s" / "report" / "claim3_forgetting_vs_flatness.csv", index_col=0)
    assert set(side["family"]) == {"forgetting", "flatness"} and {"hessian_top", "worst_case_linf_adaptive@rho=0.002"} <= set(
        side.index
    )
    assert (tmp_path / "s" / "measures").is_dir()
