"""compare() renders the paper table from synthetic reports and writes plots; the run report."""

from __future__ import annotations

import json

import pytest

from pruning_core.report import compare, compare_rows, render_markdown, write_report

DENSE = {"ppl": 20.0, "ppl_protocol": "fixed_window_256", "params": 1000, "pydoc_next_sentence.acc": 0.5,
         "pydoc_next_sentence.acc_norm": 0.6, "pydoc_last_word.acc": 0.3, "pydoc_rolling.word_perplexity": 40.0,
         "eff.decode_tokens_per_s": 100.0}


def _rep(method, ratio, ppl, ns_acc, lw_acc, tps, recovery="none", name=None):
    after = {**DENSE, "ppl": ppl, "pydoc_next_sentence.acc": ns_acc, "pydoc_last_word.acc": lw_acc,
             "eff.decode_tokens_per_s": tps}
    return {"name": name or f"{method}-{ratio}", "model": "tiny", "method": method, "target_ratio": ratio,
            "recovery": recovery, "params_before": 2_000_000, "params_after": int(2_000_000 * (1 - ratio)),
            "removed_fraction": ratio, "metrics_before": dict(DENSE), "metrics_after": after}


REPORTS = [_rep("wanda", 0.2, 25.0, 0.4, 0.3, 125.0), _rep("l2", 0.2, 40.0, 0.25, 0.15, 120.0),
           _rep("wanda", 0.4, 50.0, 0.3, 0.2, 160.0, recovery="lora")]


def test_compare_table(tmp_path):
    md = compare(REPORTS, out_dir=tmp_path)
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head[:7] == ["model", "method", "ratio", "recovery", "params", "removed (decoder)", "PPL (fixed_window_256)"]
    assert "pydoc_next_sentence acc" in head and "pydoc_next_sentence acc_norm" in head
    assert "pydoc_rolling word_perplexity" in head and head[-3:] == ["avg acc", "retention", "speed-up"]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[1:]]
    assert [r[1] for r in rows] == ["dense", "l2", "wanda", "wanda"]  # one dense row, then method x ratio
    cell = {(r[1], r[2]): dict(zip(head, r)) for r in rows}
    w = cell[("wanda", "0.20")]
    assert w["params"] == "1.6 M" and w["PPL (fixed_window_256)"] == "25.00"
    assert w["avg acc"] == "0.35"  # mean of the two tasks' acc
    # retention: ppl 20/25, ns acc .4/.5, ns acc_norm 1, lw acc 1, word ppl 1 -> mean
    assert float(w["retention"]) == pytest.approx((0.8 + 0.8 + 1 + 1 + 1) / 5, abs=5e-3)
    assert w["speed-up"] == "1.25"
    assert cell[("wanda", "0.40")]["recovery"] == "lora"
    assert cell[("dense", "0.00")]["avg acc"] == "0.40"
    png = tmp_path / "sweep.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    assert (tmp_path / "compare.md").read_text().startswith(lines[0])


def test_compare_points_and_nested_metrics():
    nested = dict(REPORTS[0])
    nested["metrics_before"] = {"perplexity": {"ppl": 20.0, "protocol": "fixed_window_256"},
                                "lm_eval": {"pydoc_next_sentence": {"acc": 0.5}}}
    nested["metrics_after"] = {"perplexity": {"ppl": 30.0, "protocol": "fixed_window_256"},
                               "lm_eval": {"pydoc_next_sentence": {"acc": 0.25}}}
    headers, rows, points = compare_rows([nested])
    assert rows[1][headers.index("PPL (fixed_window_256)")] == 30.0 and rows[1][headers.index("avg acc")] == 0.25
    assert rows[1][headers.index("retention")] == pytest.approx((20 / 30 + 0.5) / 2)
    assert {(p["method"], p["ratio"]) for p in points} == {("wanda", 0.2), ("wanda", 0.0)}


def test_run_report_markdown_with_loss_curve(tmp_path):
    layers = [{"index": 0, "keep": True, "heads": 6, "kv_heads": 3, "ffn": 1200, "ratio": 0.21},
              {"index": 1, "keep": False, "heads": None, "kv_heads": None, "ffn": None, "ratio": 1.0}]
    rep = {**REPORTS[2], "recovery": "lora", "recovery_info": {"kind": "lora", "loss_curve": [3.0, 2.5, 2.0]},
           "timings": {"prune": 1.5}, "cache": {"prune": "miss"}, "stability": 0.875, "layers": layers,
           "full_sizes": {"heads": 9, "kv_heads": 3, "ffn": 1536}, "removed_decoder_fraction": 0.605,
           "protocols": {"ppl": "fixed_window_256", "pydoc_next_sentence": "lm_eval_0shot_first50"}}
    paths = write_report(rep, tmp_path / "run")
    assert json.loads(paths["report.json"].read_text())["method"] == "wanda"
    md = paths["report.md"].read_text()
    assert "| ppl.fixed_window_256 | 20.00 | 50.00 | 0.40 |" in md
    assert "| pydoc_next_sentence/acc | 0.50 | 0.30 | 0.60 |" in md
    assert "Stability (LLM-Streamline): **87.5 %**" in md
    assert "LoRA (LM loss): training loss 3 → 2 over 3 steps" in md
    assert "| removed of decoder-layer params | 60.5 % |" in md
    assert "`pydoc_next_sentence/*` = lm-eval, protocol `lm_eval_0shot_first50`" in md
    assert "| 0 | yes | 6 | 3 | 1200 | – | 21.0 % |" in md and "| 1 | no | 0 | 0 | 0 | – | 100.0 % |" in md
    for name in ("recovery_loss.png", "kept_per_layer.png", "layer_ratios.png"):
        assert (tmp_path / "run" / "plots" / name).read_bytes()[:4] == b"\x89PNG" and f"plots/{name}" in md
    assert "recovery" not in render_markdown(REPORTS[0]).split("## Metrics")[1].lower()


def test_a_plot_that_fails_is_named_in_the_report(tmp_path):
    rep = {**REPORTS[0], "layers": [{"index": "zero", "keep": True}]}  # not a layer number: the plot fails
    md = render_markdown(rep, tmp_path / "run2" / "plots")
    assert "(plot `plot_kept_per_layer` not drawn: ValueError" in md
