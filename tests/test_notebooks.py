"""The analysis notebooks run top to bottom on real finished runs (executed with nbclient in a
fresh kernel), so they cannot rot."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

ANALYSIS = Path(__file__).resolve().parent.parent / "analysis"


@pytest.fixture(scope="module")
def offline_runs(tmp_path_factory):
    from tiny_models import make_offline_runs

    root = tmp_path_factory.mktemp("notebook_runs")
    made = make_offline_runs(root, [("fvae", 0), ("fvae", 1), ("lora", 0)])
    return root, made


def _execute(name: str, env: dict[str, str], monkeypatch) -> nbformat.NotebookNode:
    for key, value in {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    nb = nbformat.read(ANALYSIS / name, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ANALYSIS)}})
    client.execute()  # raises CellExecutionError with the failing cell on any error
    return nb


def _outputs(nb: nbformat.NotebookNode, mime: str) -> list[str]:
    return [out["data"][mime] for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if mime in out.get("data", {})]


def _stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", [])
                   if out.get("output_type") == "stream" and out.get("name") == "stdout")


def test_group_report_notebook_runs_on_real_runs(offline_runs, tmp_path, monkeypatch):
    root, _ = offline_runs
    report_dir = tmp_path / "report"
    nb = _execute("group_report.ipynb", {"RBF_RUNS_DIR": str(root / "out"),
                                         "RBF_REPORT_DIR": str(report_dir)}, monkeypatch)
    assert "3 finished run(s) in 2 row(s)" in _stdout(nb)
    markdown = "\n".join(_outputs(nb, "text/markdown"))
    assert "fvae" in markdown and "lora" in markdown and "waterbird/water" in markdown
    assert len(_outputs(nb, "image/png")) == 2  # the per-group bars and the WG-vs-avg scatter
    html = "\n".join(_outputs(nb, "text/html"))
    assert "worst_group_acc" in html  # the DataFrames are displayed
    assert (report_dir / "report.html").stat().st_size > 0


def test_latent_probing_notebook_puts_a_real_fvae_run_beside_a_lora_run(
        offline_runs, tmp_path, monkeypatch):
    root, made = offline_runs
    probe_dir = tmp_path / "probe"
    nb = _execute("latent_probing.ipynb", {
        "RBF_RUNS_DIR": str(root / "out"), "RBF_MAX_IMAGES": "10", "RBF_TSNE_MAX": "9",
        "RBF_PROBE_DIR": str(probe_dir)}, monkeypatch)
    lines = _stdout(nb).splitlines()
    chosen = lines[0]
    assert chosen.startswith("probing ") and "fvae on synth-waterbirds" in chosen
    assert any(str(made[("fvae", s)]) in chosen for s in (0, 1))
    # the only lora run of the fixture, on the same dataset, is the reference
    reference = lines[1]
    assert reference.startswith("LoRA reference ") and str(made[("lora", 0)]) in reference
    assert "lora on synth-waterbirds" in reference
    tables = "\n".join(_outputs(nb, "text/html"))
    assert "z1" in tables and "z2" in tables and "blocks.0" in tables and "norm" in tables
    assert "acc(y)" in tables and "active_units" in tables  # the comparison table is shown
    assert "learned(y)" in tables and "pooled_active_units" in tables and "mi_estimate" in tables
    assert "flip_rate" in tables and "update_ratio_median" in tables  # updates, interventions
    comparison = pd.read_csv(probe_dir / "fvae_vs_lora.csv")
    assert {"z1", "z2", "lora"} <= set(comparison.latent)
    assert set(comparison.method[comparison.latent.isin(["z1", "z2"])]) == {"fvae"}
    assert set(comparison.method[comparison.latent == "lora"]) == {"lora"}
    assert comparison[["acc(y)", "acc(a)"]].notna().all().all()
    for run in ("fvae", "lora"):
        assert (probe_dir / run / "probes.csv").is_file()
        assert sorted((probe_dir / run).glob("tsne_*.png"))
    # every figure written (the comparison, then each run's probe bars, sensitivity figure when
    # its data has twins, t-SNE maps) is displayed once; frozen_backbone/ is a table only
    written = [p for folder in (probe_dir, probe_dir / "fvae", probe_dir / "lora")
               for p in folder.glob("*.png")]
    assert (probe_dir / "fvae_vs_lora.png") in written
    assert len(_outputs(nb, "image/png")) == len(written)
    assert (probe_dir / "fvae" / "frozen_backbone" / "probes.csv").is_file()
