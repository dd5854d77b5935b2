"""The protocol's statistics, its stages (search → finals → publish → page) and the committed page.

Run records are written by the package's own record functions from predictions with known
group accuracies (tests/test_report.py's ``write_run``), at the exact configs a sweep spec plans.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats
from test_report import write_run

from robustbench_fvae import records
from robustbench_fvae.analysis import statistics
from robustbench_fvae.analysis.comparisons import COMPARISON_COLUMNS
from robustbench_fvae.sweeps import expand, load_spec, parse_spec
from robustbench_fvae.sweeps.budget import FINAL_SEEDS, budget_warnings

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- statistics


def test_binomial_half_width_is_the_noise_floor_docs_quote():
    assert statistics.binomial_half_width(642) == pytest.approx(0.0309, abs=5e-5)
    assert statistics.binomial_half_width(133) == pytest.approx(0.0680, abs=5e-5)
    assert math.isnan(statistics.binomial_half_width(0))


def test_stratified_bootstrap_brackets_the_worst_group_and_narrows_with_size():
    small = statistics.bootstrap_worst_group_interval([100, 20], [0.9, 0.6], seed=1)
    large = statistics.bootstrap_worst_group_interval([1000, 2000], [0.9, 0.6], seed=1)
    assert small[0] < 0.6 < small[1] and large[0] < 0.6 < large[1]
    assert large[1] - large[0] < (small[1] - small[0]) / 3
    # deterministic per seed; empty groups are left out; a perfect group never varies
    assert small == statistics.bootstrap_worst_group_interval([100, 20], [0.9, 0.6], seed=1)
    assert statistics.bootstrap_worst_group_interval([0, 50], [0.0, 1.0]) == (1.0, 1.0)
    # two groups tied at 0.7: the minimum of two noisy copies sits below either one's mean
    tied = statistics.bootstrap_worst_group_interval([200, 200], [0.7, 0.7], seed=0)
    assert tied[1] < 0.7 + statistics.binomial_half_width(200, 0.7)


def test_paired_difference_is_the_paired_t_test():
    a = [0.71, 0.74, 0.69, 0.77, 0.73]
    b = [0.70, 0.70, 0.70, 0.72, 0.69]
    d = statistics.paired_difference(a, b)
    ref = scipy_stats.ttest_rel(a, b)
    assert d.p_value == pytest.approx(ref.pvalue, rel=1e-10)
    diffs = np.subtract(a, b)
    half = scipy_stats.t.ppf(0.975, 4) * diffs.std(ddof=1) / math.sqrt(5)
    assert (d.ci_low, d.ci_high) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
    assert d.interval(0.95) == pytest.approx((d.ci_low, d.ci_high))
    wide = d.interval(1 - 0.05 / 3)
    assert wide[0] < d.ci_low and wide[1] > d.ci_high
    same = statistics.paired_difference([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert (same.mean_diff, same.p_value, same.ci_low) == (0.0, 1.0, 0.0)
    # equal nonzero differences: the exact sign test, not a t-test of zero spread (p = 0)
    assert statistics.paired_difference([0.6, 0.7], [0.5, 0.6]).p_value == pytest.approx(0.5)
    three = statistics.paired_difference([0.6, 0.7, 0.8], [0.5, 0.6, 0.7])
    assert three.p_value == pytest.approx(0.25) and three.ci_low == three.ci_high
    assert statistics.paired_difference([0.6] * 6, [0.5] * 6).p_value == pytest.approx(1 / 32)
    assert math.isnan(statistics.paired_difference([0.5], [0.4]).p_value)


def test_holm_adjustment_and_levels_by_hand():
    p = [0.01, 0.04, 0.03, float("nan"), 0.005]
    # sorted: 0.005 (×4) 0.01 (×3) 0.03 (×2) 0.04 (×1), monotone
    assert statistics.holm_adjust(p)[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(statistics.holm_adjust(p)[3])
    assert statistics.holm_adjust(p)[4] == pytest.approx(0.02)
    levels = statistics.holm_levels(p)
    # 0.005 < 0.05/4 rejects; 0.01 < 0.05/3 rejects; 0.03 >= 0.05/2 stops: it and 0.04 keep 0.975
    assert levels[4] == pytest.approx(1 - 0.05 / 4) and levels[0] == pytest.approx(1 - 0.05 / 3)
    assert levels[2] == levels[1] == pytest.approx(0.975)
    # the rule the page relies on: at its level, an interval excludes 0 iff p_holm < 0.05
    a, b = [0.04, 0.03], [0.06, 0.06]
    assert statistics.holm_adjust(a) == pytest.approx(b)
    assert statistics.holm_levels(a) == pytest.approx([0.975, 0.975])


# --------------------------------------------------------------------------- specs


def spec_data(**extra) -> dict:
    return {"methods": ["lora", "fvae"], "datasets": ["synth-waterbirds"], "seeds": [0],
            "settings": {"epochs": 2}, **extra}


def test_cells_give_each_pair_its_own_configurations(tmp_path):
    spec = parse_spec(spec_data(seeds=[1, 2], cells={
        "synth-waterbirds": {"lora": [{"lr": 0.002}, {"lr": 0.004}],
                             "fvae": [{"lr": 0.003, "beta": 2.5}]}}), "final")
    runs = expand(spec, out=tmp_path)
    assert sorted((r.method, r.config.train.lr, r.seed) for r in runs) == [
        ("fvae", 0.003, 1), ("fvae", 0.003, 2), ("lora", 0.002, 1), ("lora", 0.002, 2),
        ("lora", 0.004, 1), ("lora", 0.004, 2)]
    assert {r.config.adapter.beta for r in runs if r.method == "fvae"} == {2.5}
    with pytest.raises(ValueError, match="cells: explicit configurations replace grid"):
        parse_spec(spec_data(grid={"lr": [0.1]}, cells={"synth-waterbirds": {"lora": [{}]}}), "x")
    with pytest.raises(ValueError, match="method 'full' is not in the spec's methods"):
        parse_spec(spec_data(cells={"synth-waterbirds": {"full": [{"lr": 0.1}]}}), "x")
    with pytest.raises(ValueError, match=r"cells.synth-waterbirds.lora\[0\].lrr: unknown setting"):
        parse_spec(spec_data(cells={"synth-waterbirds": {"lora": [{"lrr": 0.1}]}}), "x")


def test_budget_warnings_name_a_reduced_rerun():
    committed = load_spec(REPO / "runs" / "protocol-search.yaml")
    assert budget_warnings(committed) == []
    assert {len(committed.trials(m)) for m in committed.methods} == {8}
    small = parse_spec(spec_data(random={"n": 3, "space": {"lr": {"log_uniform": [1e-3, 1e-2]}}}),
                       "small")
    (line,) = budget_warnings(small)
    assert "fewer configurations than the protocol's 8" in line and "lora 3" in line
    unequal = parse_spec(spec_data(random={"n": 8, "space": {"lr": {"log_uniform": [1e-3, 1e-2]}}},
                                   grid={"beta": [1.0, 2.0]}), "unequal")
    assert budget_warnings(unequal) == []  # grid × draws: 16 each, equal
    for name in ("curves-synth.yaml", "robust.yaml", "robust-synth.yaml", "table5.yaml"):
        assert budget_warnings(load_spec(REPO / "runs" / name)) == [], name
    few_seeds = parse_spec(spec_data(seeds=[1, 2], cells={"synth-waterbirds": {"lora": [{}]}}),
                           "few")
    assert "2 seed(s) per chosen configuration, fewer than the protocol's 5" in \
        budget_warnings(few_seeds)[0]


def test_sweep_cli_prints_the_budget_warning(tmp_path, capsys):
    from robustbench_fvae.sweep import main

    data = spec_data(random={"n": 2, "space": {"lr": {"log_uniform": [1e-3, 1e-2]}}},
                     settings={"epochs": 1, "out": str(tmp_path / "out")})
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main([str(path), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: small: a search of fewer configurations") and \
        "not a reproduction" in err


# --------------------------------------------------------------------------- the stages

# Group accuracies (landbird/land, landbird/water, waterbird/land, waterbird/water) realisable on
# the fixture's group sizes 40/10/10/20: WG is the middle two.
SEARCH_VAL_WG = {("lora", 0): 0.5, ("lora", 1): 0.7, ("fvae", 0): 0.6, ("fvae", 1): 0.4}


def accs(wg: float) -> list[float]:
    return [0.9, wg, wg + 0.1, 0.95]


def write_planned(run, val_wg: float, test_wg: float) -> Path:
    return write_run(Path(run.config.out), config=run.config,
                     test_accs=(accs(test_wg),), val_accs=(accs(val_wg),))


@pytest.fixture
def protocol_tree(tmp_path, monkeypatch):
    """A finished two-method search (2 draws each) on synth-waterbirds, in tmp_path."""
    monkeypatch.chdir(tmp_path)
    search = {"methods": ["lora", "fvae"], "datasets": ["synth-waterbirds"], "seeds": [0],
              "settings": {"epochs": 1, "out": "runs/search"},
              "random": {"n": 2, "hparam_seed": 0, "per_method": {
                  "lora": {"lr": {"log_uniform": [1e-3, 1e-2]}},
                  "fvae": {"lr": {"log_uniform": [1e-3, 1e-2]},
                           "beta": {"log_uniform": [1.0, 10.0]}}}}}
    Path("search.yaml").write_text(yaml.safe_dump(search))
    runs = expand(load_spec("search.yaml"))
    for run in runs:
        wg = SEARCH_VAL_WG[(run.method, run.trial)]
        write_planned(run, val_wg=wg, test_wg=wg)
    return runs


def test_finals_publish_and_page(protocol_tree, capsys):
    from robustbench_fvae.analysis.results_page import build_page, check_page, write_page
    from robustbench_fvae.protocol import main, publish

    assert main(["finals", "--spec", "search.yaml", "--out", "final.yaml",
                 "--controls-out", "controls.yaml"]) == 0
    final_text = Path("final.yaml").read_text()
    assert final_text.startswith("# Written by `python -m robustbench_fvae.protocol finals`")
    final = load_spec("final.yaml")
    assert final.seeds == list(FINAL_SEEDS) and budget_warnings(final) == []
    by_trial = {(r.method, r.trial): r for r in protocol_tree}
    lora_pick = by_trial[("lora", 1)].config  # val WG 0.7 beats 0.5
    fvae_pick = by_trial[("fvae", 0)].config  # 0.6 beats 0.4
    cells = final.cells["synth-waterbirds"]
    # both rules agree here (the val average follows WG): one configuration per method
    assert cells["lora"] == [{"lr": lora_pick.train.lr}]
    assert cells["fvae"] == [{"lr": fvae_pick.train.lr, "beta": fvae_pick.adapter.beta}]
    # a later pick of one method keeps the other's cells (and the same text)
    assert main(["finals", "--spec", "search.yaml", "--out", "final.yaml", "--controls-out",
                 "controls.yaml", "--methods", "lora"]) == 0
    assert load_spec("final.yaml").cells == final.cells
    assert "kept from the earlier final.yaml: synth-waterbirds fvae" in \
        Path("final.yaml").read_text()
    controls = load_spec("controls.yaml")
    assert controls.cells["synth-waterbirds"]["lora"] == [
        {"lr": lora_pick.train.lr, "epochs": 20, "patience": 5},
        {"lr": lora_pick.train.lr, "targets": ("q", "v")}]

    # final runs: FVAE-LoRA 10 points of WG above LoRA on seeds 1-4, 20 on seed 5
    finals = expand(final)
    assert {r.seed for r in finals} == set(FINAL_SEEDS) and len(finals) == 10
    for run in finals:
        base = 0.5 + 0.1 * (run.seed % 2)
        gain = (0.2 if run.seed == 5 else 0.1) if run.method == "fvae" else 0.0
        write_planned(run, val_wg=0.6, test_wg=base + gain)
    counts = publish("results/protocol", specs={"search": "search.yaml", "final": "final.yaml",
                                                "controls": "controls.yaml"}, log=lambda _: None)
    assert counts == {"search": 4, "final": 10, "controls": 0}
    published = Path("results/protocol/final/synth-waterbirds/fvae") / finals[-1].hash
    assert sorted(p.name for p in published.iterdir()) == [
        "config.json", "done", "history.jsonl", "metrics.json", "predictions_test.csv.gz",
        "predictions_val.csv.gz"]
    assert not list(Path("results/protocol/search").rglob("predictions_*"))
    # the published predictions recompute the recorded metrics
    rec = records.load_run(published)
    pred = records.read_predictions(records.predictions_path(published, "test"))
    assert pred["pred"].size == 80
    assert records.recompute_metrics(published)["test"]["worst_group_acc"] == \
        pytest.approx(rec.metrics["test"]["worst_group_acc"])

    text, figures, block = build_page("results/protocol", "results")
    assert block.startswith("<!-- results:begin -->") and \
        "| synth-waterbirds | FVAE-LoRA | 68.0 [57.6, 78.4] (5) | 68.0 [57.6, 78.4] (5) |" in block
    # the answer in one sentence per rule, from the same comparisons, on the page and the block
    answer = next(line for line in block.splitlines() if line.startswith(
        "**The answer, selection val_wg:** of 3 paired comparisons with LoRA (1 method × WG"))
    assert "synth-waterbirds FVAE-LoRA − LoRA WG +12.0 [+5.0, +19.0] points" in answer
    Path("README.md").write_text("# r\n\n<!-- results:begin -->\nold\n<!-- results:end -->\nend\n")
    assert set(figures) == {"forest_val_wg.png", "forest_val_avg.png"}
    assert "## Selection by val_wg" in text and "## Selection by val_avg" in text
    assert "synth-waterbirds: FVAE-LoRA's WG is higher than LoRA's by +12.0 [+5.0, +19.0]" \
        in text
    assert "| synth-waterbirds | FVAE-LoRA |" in text and "| 2 | 60.0 | 5 (1, 2, 3, 4, 5) |" \
        in text
    assert "The control runs (runs/protocol-controls.yaml) are not in the results yet" in text
    assert write_page("results/protocol", "docs/results.md")[1:] == [
        Path("docs/results/forest_val_wg.png"), Path("docs/results/forest_val_avg.png"),
        Path("README.md")]
    readme = Path("README.md").read_text()
    assert readme.startswith("# r\n\n<!-- results:begin -->") and readme.endswith(
        "<!-- results:end -->\nend\n") and "old" not in readme
    assert "[docs/results.md](docs/results.md)" in readme
    assert check_page("results/protocol", "docs/results.md") is None
    Path("README.md").write_text(readme.replace("68.0 [57.6", "69.0 [57.6"))
    assert "README.md's block between <!-- results:begin --> and <!-- results:end --> differs" \
        in check_page("results/protocol", "docs/results.md")
    Path("README.md").write_text(readme)
    Path("docs/results.md").write_text(text.replace("+12.0", "+13.0"))
    assert "docs/results.md differs from line " in check_page("results/protocol",
                                                               "docs/results.md")
    assert main(["page", "results/protocol", "--out", "docs/results.md", "--check"]) == 1
    capsys.readouterr()

    # one control arm recorded (targets q,v): FVAE-LoRA 30 points above LoRA there, 10-20 by
    # default
    for run in expand(controls):
        if run.config.adapter.targets == ("q", "v"):
            base = 0.5 + 0.1 * (run.seed % 2)
            write_planned(run, val_wg=0.6, test_wg=base + (0.3 if run.method == "fvae" else 0.0))
    publish("results/protocol", specs={"search": "search.yaml", "final": "final.yaml",
                                       "controls": "controls.yaml"}, log=lambda _: None)
    text = build_page("results/protocol", "results")[0]
    qv = next(line for line in text.splitlines()
              if line.startswith("| 5 epochs, targets q,v, selected epoch | WG |"))
    assert "| 5 | " in qv and "+30.0 [+30.0, +30.0] | +18.0 [" in qv and \
        qv.endswith("the difference changes |")
    long = next(line for line in text.splitlines() if line.startswith("| 20 epochs"))
    assert long.endswith("not in the records yet |")


def test_a_fresh_clone_picks_from_and_keeps_the_published_records(protocol_tree, capsys):
    """On a machine with only the committed results/ (no runs/ folders): the picks come from the
    published search records, and publishing what ran here keeps what ran elsewhere."""
    import shutil

    from robustbench_fvae.protocol import main, publish, search_results

    assert main(["finals", "--spec", "search.yaml", "--out", "final.yaml",
                 "--controls-out", "controls.yaml"]) == 0
    finals = expand(load_spec("final.yaml"))
    for run in finals:
        write_planned(run, val_wg=0.6, test_wg=0.6)
    specs = {"search": "search.yaml", "final": "final.yaml", "controls": "controls.yaml"}
    assert publish("results/protocol", specs=specs, log=lambda _: None) == {
        "search": 4, "final": 10, "controls": 0}
    before = sorted(str(p) for p in Path("results").rglob("*"))
    shutil.rmtree("runs")  # the fresh clone: the search's and the finals' run folders gone
    shutil.rmtree("final")
    _, results = search_results("search.yaml")
    assert len(results) == 4 and all("results/protocol/search" in str(r.path) for r in results)
    assert main(["finals", "--spec", "search.yaml", "--out", "final2.yaml",
                 "--controls-out", "controls2.yaml"]) == 0
    assert load_spec("final2.yaml").cells == load_spec("final.yaml").cells
    write_planned(finals[0], val_wg=0.6, test_wg=0.6)  # one final rerun here
    log: list[str] = []
    assert publish("results/protocol", specs=specs, log=log.append) == {
        "search": 4, "final": 10, "controls": 0}
    assert sorted(str(p) for p in Path("results").rglob("*")) == before
    assert "published 1 of 10 planned run(s) of final.yaml" in log[1] and \
        "9 published earlier kept" in log[1]
    # a published record that the spec does not plan is still removed
    stray = Path("results/protocol/final/synth-waterbirds/lora/000000000000")
    shutil.copytree(next(stray.parent.iterdir()), stray)
    publish("results/protocol", specs=specs, log=log.append)
    assert not stray.exists()
    capsys.readouterr()


def test_peft_section_ranks_the_zoo_against_the_main_protocols_lora(protocol_tree, capsys):
    """The peft methods' records (their own search and finals, `publish --to`) become a section
    of docs/results.md: ranked with LoRA and FVAE-LoRA of the main protocol, each compared with
    LoRA by seed (Holm over the zoo's comparisons); a method whose search is incomplete is not
    picked; the README block quotes the section's answer."""
    from robustbench_fvae.analysis.results_page import build_page
    from robustbench_fvae.analysis.zoo_section import ZOO_SEARCH_SPEC, zoo_sections
    from robustbench_fvae.protocol import main, publish

    # the main protocol: LoRA's finals at 0.5/0.6 WG by seed parity, FVAE-LoRA 0.1 higher
    assert main(["finals", "--spec", "search.yaml", "--out", "final.yaml",
                 "--controls-out", "none"]) == 0
    for run in expand(load_spec("final.yaml")):
        base = 0.5 + 0.1 * (run.seed % 2)
        write_planned(run, val_wg=0.6, test_wg=base + (0.1 if run.method == "fvae" else 0.0))
    publish("results/protocol", specs={"search": "search.yaml", "final": "final.yaml",
                                       "controls": "none"}, log=lambda _: None)
    # the zoo: peft-lora's and peft-vera's search complete (2 of 2), peft-ia3's not (1 of 2);
    # peft-lora's val_avg pick (draw 0: higher average, lower WG) differs from its val_wg pick
    methods = ["peft-lora", "peft-vera", "peft-ia3"]
    zoo = {"methods": methods, "datasets": ["synth-waterbirds"], "seeds": [0],
           "settings": {"epochs": 1, "out": "runs/zoo"},
           "random": {"n": 2, "hparam_seed": 0, "per_method": {
               m: {"lr": {"log_uniform": [1e-3, 1e-2]}} for m in methods}}}
    Path(ZOO_SEARCH_SPEC).parent.mkdir(exist_ok=True)
    Path(ZOO_SEARCH_SPEC).write_text(yaml.safe_dump(zoo))
    for run in expand(load_spec(ZOO_SEARCH_SPEC))[:5]:
        if (run.method, run.trial) == ("peft-lora", 0):
            write_run(Path(run.config.out), config=run.config, test_accs=(accs(0.5),),
                      val_accs=([1.0, 0.5, 0.6, 1.0],))
        else:
            write_planned(run, val_wg=0.5 + 0.1 * run.trial, test_wg=0.5)
    assert main(["finals", "--spec", ZOO_SEARCH_SPEC, "--methods", "peft-lora", "peft-vera",
                 "--out", "zoo-final.yaml", "--controls-out", "none", "--rules", "val_wg"]) == 0
    for run in expand(load_spec("zoo-final.yaml")):  # peft-lora: 20 points above LoRA, 30 on
        gain = (0.3 if run.seed == 5 else 0.2) if run.method == "peft-lora" else 0.0  # seed 5
        write_planned(run, val_wg=0.6, test_wg=0.5 + 0.1 * (run.seed % 2) + gain)
    publish("results/protocol-peft", log=lambda _: None,
            specs={"search": ZOO_SEARCH_SPEC, "final": "zoo-final.yaml", "controls": "none"})

    text, figures, block = build_page("results/protocol", "results", sections=zoo_sections())
    section = text[text.index("## The peft library's methods against LoRA"):]
    assert "the records in `results/protocol-peft/` (5 search runs, 10 final runs)" in section
    wg_part = section[:section.index("### Selection by val_avg")]
    ranked = [line for line in wg_part.splitlines() if line[:4] in ("| 1 ", "| 2 ", "| 3 ",
                                                                     "| 4 ")]
    assert [line.split(" | ")[1] for line in ranked] == ["peft LoRA", "FVAE-LoRA", "VeRA",
                                                         "LoRA"]  # a tie keeps table order
    assert ranked[0].split(" | ")[7].startswith("+22.0 [+") and \
        ranked[0].split(" | ")[8] == "higher"
    assert ranked[0].split(" | ")[9:11] == ["–", "reference"]
    assert ranked[1].split(" | ")[7:11] == ["–", "in the main table", "–", "not in this family"]
    assert ranked[2].split(" | ")[7:9] == ["+0.0 [+0.0, +0.0]", "no difference shown"]
    assert ranked[2].split(" | ")[10] == "lower" and ranked[3].split(" | ")[10] == "lower"
    assert "**The peft methods against LoRA, selection val_wg:** of 6 paired comparisons on " \
        "synth-waterbirds (2 methods × WG" in section
    # the same targets: VeRA and LoRA (q,k) against peft LoRA (qkv)
    assert "**The peft methods against peft LoRA, selection val_wg:** of 6 paired " \
        "comparisons on synth-waterbirds (2 methods" in section and \
        "synth-waterbirds LoRA − peft LoRA WG -22.0 [" in section
    assert "| IA3 | 1 of 2 | 0 | search incomplete: not picked |" in section
    assert "| peft LoRA | 2 of 2 | 5 | finals run |" in section
    # val_avg: VeRA's pick is the same draw (its runs are there), peft LoRA's is not
    val_avg = section[section.index("### Selection by val_avg"):]
    assert "*Partial:* 1 of 2 picks of val_avg have no final runs" in val_avg
    assert "synth-waterbirds/peft-lora: the val_avg pick" in val_avg
    assert "forest_peft_val_wg.png" in figures and "(results/forest_peft_val_wg.png)" in section
    assert "**The peft methods against LoRA, selection val_wg:**" in block and \
        "against LoRA, selection val_avg" not in block  # the README quotes complete tables
    # a stale peft part: `page --check` names the line, its heading and the peft folder
    Path("docs").mkdir(exist_ok=True)
    Path("docs/results.md").write_text(text.replace("| IA3 | 1 of 2 |", "| IA3 | 2 of 2 |"))
    line = text.splitlines().index(next(x for x in text.splitlines() if x.startswith("| IA3 |")))
    assert main(["page", "--check", "--readme", "none"]) == 1
    assert capsys.readouterr().err.startswith(
        f"docs/results.md differs from line {line + 1}, under 'What the zoo's records hold', "
        "from what the records in results/protocol and results/protocol-peft give; "
        "regenerate it with `python -m robustbench_fvae.protocol page`")
    # without the section, the page is the main protocol's alone; a named folder must exist
    assert "## The peft library" not in build_page("results/protocol", "results")[0]
    with pytest.raises(ValueError, match="peft results folder not found: nowhere"):
        zoo_sections("nowhere", required=True)
    assert zoo_sections("nowhere") == []
    assert main(["page", "--peft-results", "nowhere", "--check", "--readme", "none"]) == 2
    assert "peft results folder not found" in capsys.readouterr().err


def test_finals_of_one_rule_and_no_controls(protocol_tree, capsys):
    """`--rules val_wg --controls-out none`: the val_wg picks alone, and no controls spec (the
    peft zoo's finals, runs/protocol-peft-search.yaml)."""
    from robustbench_fvae.protocol import main

    # the val average now disagrees with WG for LoRA: draw 0 has the better average
    for run in protocol_tree:
        if run.method == "lora" and run.trial == 0:
            write_run(Path(run.config.out), config=run.config, test_accs=(accs(0.5),),
                      val_accs=([1.0, 0.5, 0.6, 1.0],))
    assert main(["finals", "--spec", "search.yaml", "--out", "both.yaml",
                 "--controls-out", "none"]) == 0
    assert len(load_spec("both.yaml").cells["synth-waterbirds"]["lora"]) == 2
    capsys.readouterr()
    assert main(["finals", "--spec", "search.yaml", "--out", "wg.yaml",
                 "--controls-out", "none", "--rules", "val_wg"]) == 0
    assert capsys.readouterr().out.splitlines() == ["wrote wg.yaml"]
    text = Path("wg.yaml").read_text()
    assert "under val_wg," in text and "val_avg" not in text
    by_trial = {(r.method, r.trial): r.config for r in protocol_tree}
    assert load_spec("wg.yaml").cells["synth-waterbirds"]["lora"] == [
        {"lr": by_trial[("lora", 1)].train.lr}]
    assert sorted(p.name for p in Path().glob("*.yaml")) == ["both.yaml", "search.yaml",
                                                            "wg.yaml"]
    assert main(["finals", "--spec", "search.yaml", "--out", "x.yaml", "--rules", "val_best"]
                ) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown selection rule 'val_best'" in err


def test_finals_refuse_an_incomplete_search_in_one_line(protocol_tree, capsys):
    from robustbench_fvae.protocol import main

    os.remove(protocol_tree[0].run_dir / records.DONE_FILE)
    assert main(["finals", "--spec", "search.yaml", "--out", "final.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 of 4 search run(s) are not finished" in err
    assert not Path("final.yaml").exists()
    assert main(["page", "nowhere"]) == 2
    assert "results folder not found: nowhere" in capsys.readouterr().err


def test_report_writes_comparisons_with_the_documented_columns(tmp_path):
    from robustbench_fvae.report import build_report

    for seed in range(1, 6):
        base = 0.5 + 0.1 * (seed % 2)
        write_run(tmp_path, method="lora", seed=seed, test_accs=(accs(base),))
        # 10 points better on average, with a spread (equal differences get the sign test)
        write_run(tmp_path, method="fvae", seed=seed,
                  test_accs=(accs(base + (0.2 if seed == 5 else 0.1)),))
        write_run(tmp_path, method="vae2lat", seed=seed,
                  test_accs=(accs(base + (0.1 if seed % 2 else -0.1)),))
    report = build_report(tmp_path, tmp_path / "report")
    with open(report.files["comparisons.csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == COMPARISON_COLUMNS
    assert COMPARISON_COLUMNS[:10] == ("dataset", "method", "reference", "metric", "n_pairs",
                                       "mean_diff", "ci_low", "ci_high", "p_value", "p_holm")
    wg = {r["method"]: r for r in rows if r["metric"] == "worst_group_acc"}
    assert float(wg["fvae"]["mean_diff"]) == pytest.approx(0.12)
    assert wg["fvae"]["declared"] == "True" and wg["vae2lat"]["declared"] == "False"
    assert float(wg["vae2lat"]["p_holm"]) >= float(wg["vae2lat"]["p_value"])
    assert report.files["forest.png"].read_bytes().startswith(b"\x89PNG")
    with open(report.files["runs.csv"], newline="") as fh:
        run_rows = list(csv.DictReader(fh))
    assert all(float(r["wg_boot_low"]) <= float(r["worst_group_acc"]) <= float(r["wg_boot_high"])
               for r in run_rows)
    assert "## Noise floor" in report.files["table.md"].read_text()


def test_committed_results_page_matches_its_records(monkeypatch):
    """docs/results.md is what `python -m robustbench_fvae.protocol page` writes from
    results/protocol: regenerate it after publishing, never edit it by hand."""
    from robustbench_fvae.analysis.latents_page import check_latents_page
    from robustbench_fvae.analysis.results_page import check_page
    from robustbench_fvae.analysis.zoo_section import zoo_sections

    monkeypatch.chdir(REPO)
    assert check_page("results/protocol", "docs/results.md",
                      sections=zoo_sections(required=True)) is None
    assert check_latents_page("results/protocol", "docs/latents.md") is None


def _write_probe_tables(run_dir: Path, method: str, seed: int) -> None:
    """A probe folder in the layout `probe` writes, with planted values: FVAE-LoRA's updates
    flip 10 points more predictions than LoRA's under every intervention; z1 carries 0.5 nats
    (0 on seed 1)."""
    from robustbench_fvae.analysis.evidence import SUMMARY_COLUMNS
    from robustbench_fvae.analysis.interventions import INTERVENTION_COLUMNS
    from robustbench_fvae.analysis.probes import CSV_COLUMNS
    from robustbench_fvae.analysis.sensitivity import SENSITIVITY_COLUMNS
    from robustbench_fvae.analysis.updates import UPDATE_COLUMNS

    def full(columns, row):
        return {c: row.get(c, math.nan) for c in columns}

    folder = run_dir / "probe"
    folder.mkdir()
    layer = "blocks.3.attn.qkv:q"
    flips = 0.05 * seed + (0.1 + 0.005 * (seed - 3) if method == "fvae" else 0.0)
    records.write_csv_atomic(folder / "interventions.csv", INTERVENTION_COLUMNS, [
        full(INTERVENTION_COLUMNS, {"target": "all", "scope": "all", "intervention": kind,
                                    "n": 80, "flip_rate": flips, "delta_wg": -0.01 * seed,
                                    "delta_avg": 0.0, "margin_change": 0.1})
        for kind in ("zero", "mean", "background_only", "background_swapped")])
    records.write_csv_atomic(folder / "updates.csv", UPDATE_COLUMNS, [full(UPDATE_COLUMNS, {
        "layer": layer, "method": method, "update_ratio_median": 0.01 * seed,
        "image_update_ratio_median": 0.005, "relative_displacement": 0.5})])
    summary = [] if method == "lora" else [
        full(SUMMARY_COLUMNS, {"split": "test", "layer": layer, "latent": latent, "units": 16,
                               "active_units": 0 if seed == 1 else 4,
                               "collapsed": latent == "z1" and seed == 1,
                               "data": 0.0 if (seed == 1 and latent == "z1") else 0.5,
                               "mi_estimate": 0.2})
        for latent in ("z1", "z2")]
    records.write_csv_atomic(folder / "information_summary.csv", SUMMARY_COLUMNS, summary)
    codes = ["lora"] if method == "lora" else ["z1", "z2"]
    records.write_csv_atomic(folder / "probes.csv", CSV_COLUMNS, [
        full(CSV_COLUMNS, {"layer": layer, "latent": code, "target": t, "acc": 0.8,
                           "learned": 0.1 if code == "z2" else 0.0})
        for code in codes for t in ("y", "a")])
    records.write_csv_atomic(folder / "sensitivity.csv", SENSITIVITY_COLUMNS, [
        full(SENSITIVITY_COLUMNS, {"layer": layer, "latent": code, "ratio": 2.0})
        for code in codes])
    (folder / "probe.json").write_text("{}")


def test_latents_page_from_published_probe_tables(protocol_tree, capsys):
    from robustbench_fvae.analysis.latents_page import (
        build_latents_page,
        check_latents_page,
        write_latents_page,
    )
    from robustbench_fvae.protocol import main, pick_runs, publish

    assert main(["finals", "--spec", "search.yaml", "--out", "final.yaml",
                 "--controls-out", "controls.yaml"]) == 0
    capsys.readouterr()
    for run in expand(load_spec("final.yaml")):
        write_planned(run, val_wg=0.6, test_wg=0.6)
    picked = pick_runs("final.yaml", "search.yaml", "val_wg")
    assert len(picked) == 10
    for path in picked:
        rec = records.load_run(path)
        _write_probe_tables(path, rec.method, rec.config["config"]["train"]["seed"])
    publish("results/protocol", specs={"search": "search.yaml", "final": "final.yaml"},
            log=lambda _: None)
    published = Path("results/protocol/final/synth-waterbirds/fvae") / picked[-1].name
    assert sorted(p.name for p in (published / "probe").iterdir()) == [
        "information_summary.csv", "interventions.csv", "probe.json", "probes.csv",
        "sensitivity.csv", "updates.csv"]
    text, block = build_latents_page("results/protocol")
    # z1's data KL: 0 on seed 1, 0.5 on the four others; collapsed on one seed of five
    assert "| FVAE-LoRA | blocks.3 q | 5 | 0.400 [0.122, 0.678] | 3.2 [1.0, 5.4] |" in text
    assert "| 1/5 |" in text
    # flips: LoRA 0.05·seed, FVAE-LoRA 9-11 points more → declared (Holm); t-interval by hand
    half = 100 * scipy_stats.t.ppf(0.975, 4) * np.std([-0.01, -0.005, 0, 0.005, 0.01],
                                                      ddof=1) / math.sqrt(5)
    assert (f"| FVAE-LoRA − LoRA: flips, background-swapped | 5 | +10.00 | "
            f"[{10 - half:+.2f}, {10 + half:+.2f}] |" in text) and "higher" in text
    assert "FVAE-LoRA: replacing every update by zero changes test WG by -3.0" in block
    assert "FVAE-LoRA − LoRA: flips, zero +10.0 [+" in block
    Path("README.md").write_text("# r\n<!-- latents:begin -->\nold\n<!-- latents:end -->\n")
    write_latents_page("results/protocol", "docs/latents.md")
    assert check_latents_page("results/protocol", "docs/latents.md") is None
    assert "old" not in Path("README.md").read_text()
    Path("docs/latents.md").write_text(text.replace("0.400", "0.401"))
    assert check_latents_page("results/protocol", "docs/latents.md").startswith(
        "docs/latents.md differs from line ")
    Path("docs/latents.md").write_text(text)
    Path("README.md").write_text(Path("README.md").read_text().replace("+10.0 [+", "+11.0 [+"))
    assert check_latents_page("results/protocol", "docs/latents.md").startswith(
        "README.md's block between <!-- latents:begin --> and <!-- latents:end --> differs")
    Path("docs/latents.md").unlink()
    assert check_latents_page("results/protocol", "docs/latents.md").startswith(
        "docs/latents.md does not exist; regenerate it with")

    # the control arms' runs of the picks are probed (pick_runs on the controls spec), published
    # and shown as sections of their own
    controls = expand(load_spec("controls.yaml"))
    for run in controls:
        write_planned(run, val_wg=0.6, test_wg=0.6)
    picked = pick_runs("controls.yaml", "search.yaml", "val_wg")
    assert sorted(map(str, picked)) == sorted(str(r.run_dir) for r in controls)
    for path in picked:
        rec = records.load_run(path)
        if rec.config["config"]["adapter"]["targets"] == ["q", "v"]:
            _write_probe_tables(path, rec.method, rec.config["config"]["train"]["seed"])
    publish("results/protocol", specs={"search": "search.yaml", "final": "final.yaml",
                                       "controls": "controls.yaml"}, log=lambda _: None)
    text, block = build_latents_page("results/protocol")
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections == ["## synth-waterbirds",
                        "## synth-waterbirds, 5 epochs, targets q,v, selected epoch"]
    assert "**synth-waterbirds, 5 epochs, targets q,v, selected epoch** (the val_wg picks" \
        in block


def test_intervals_of_non_negative_quantities_are_clipped_at_zero():
    """A t-interval is symmetric; a KL, a count or a flip rate is not: the latents page clips
    the lower end at 0 where the quantity cannot go below it, and nowhere else."""
    from robustbench_fvae.analysis.aggregate import summarize
    from robustbench_fvae.analysis.latents_page import _num

    stat = summarize([0.0, 0.0, 0.0, 0.0, 1.0])  # mean 0.2, t-interval [-0.36, 0.76]
    assert _num(stat) == "0.20 [-0.36, 0.76]"
    assert _num(stat, floor=0.0) == "0.20 [0.00, 0.76]"
