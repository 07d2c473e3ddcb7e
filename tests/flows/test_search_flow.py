"""`schedule: search` through the real flow and command line: the per-layer tables are one cached step that a
second budget reuses (only the solve and the prune are recomputed), and every bad search / budget field is
one line on stderr with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flows.compress import compress

REPO = Path(__file__).resolve().parents[2]


def _search_spec(tiny_spec: dict, **kw) -> dict:
    return {**tiny_spec, "method": {"name": "slimgpt", "settings": {}}, "schedule": "search",
            "search": {"kl_blocks": 2}, **kw}


def test_a_second_budget_reuses_the_tables(prefect_harness, tiny_spec):
    first = compress(spec=_search_spec(tiny_spec, ratio=0.4))
    assert first["cache"]["layer_tables"] == "miss" and first["cache"]["prune"] == "miss"
    second = compress(spec=_search_spec(tiny_spec, ratio=0.25))
    assert second["cache"]["layer_tables"] == "hit", second["cache"]  # through Prefect's task cache + the store
    assert second["cache"]["prune"] == "miss" and second["cache_why"]["prune"] == "settings: ratio: 0.4 -> 0.25"
    # a memory budget: the same tables again
    third = compress(spec=_search_spec({k: v for k, v in tiny_spec.items() if k != "ratio"},
                                       budget={"memory_mb": 0.3, "seq_len": 64}))
    assert third["cache"]["layer_tables"] == "hit"
    # `pruneflow plan` solves over the cached tables: the widths the run used, and its memory figure
    from flows.dryrun import dry_run
    from flows.spec import build_spec

    res = dry_run(build_spec(overrides=[], **_flat(_search_spec(tiny_spec, ratio=0.25))))
    assert res["search"]["tables"] == "cached"
    kept = second["plan_notes"]["search"]["kept_ffn"]
    assert [r["ffn_after"] for r in res["layers"]] == kept
    # a table setting is part of the key
    fourth = compress(spec=_search_spec(tiny_spec, ratio=0.25, search={"sensitivity": "kl", "kl_blocks": 2}))
    assert fourth["cache"]["layer_tables"] == "miss"


def test_llm_rank_searches_ffn_widths_only(prefect_harness, tiny_spec):
    """LLM-Rank under `schedule: search`: the FFN widths come from the tables (they differ by layer), the
    channels from PageRank, and no head is removed; the budget is met to one FFN channel."""
    rep = compress(spec={**tiny_spec, "method": {"name": "llm-rank", "settings": {}}, "schedule": "search",
                         "search": {"kl_blocks": 2}, "ratio": 0.3})
    assert rep["cache"]["layer_tables"] == "miss"
    notes = rep["plan_notes"]["search"]
    assert len(set(notes["kept_ffn"])) > 1 and set(notes["kept_q"]) == {4}
    cfg = yaml.safe_load((Path(tiny_spec["model"]["ref"]) / "config.json").read_text())
    ch = 3 * cfg["hidden_size"]  # gate, up and down: one FFN channel's parameters
    removed = sum(cfg["intermediate_size"] - k for k in notes["kept_ffn"]) * ch
    dec = cfg["num_hidden_layers"] * (cfg["intermediate_size"] * ch + 2 * cfg["hidden_size"] ** 2
                                      + 2 * cfg["hidden_size"] * cfg["num_key_value_heads"]
                                      * cfg["hidden_size"] // cfg["num_attention_heads"])
    assert abs(removed - 0.3 * dec) <= ch / 2 + 1


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("settings", "search", "budget"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_plan_shows_an_estimate_and_rejects_an_infeasible_budget(tiny_spec, tmp_path):
    spec = {**_search_spec(tiny_spec), "search": {"ffn_multiple": 8}}
    r = _cli(tmp_path, spec)
    assert r.returncode == 0, r.stderr
    assert "schedule: search (estimate)" in r.stdout and "serving memory" in r.stdout
    spec.pop("ratio")
    r = _cli(tmp_path, {**spec, "budget": {"memory_mb": 0.01, "seq_len": 64}})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "budget.memory_mb: got 0.01; accepted: memory_mb >= " in r.stderr, r.stderr


def _cli(tmp: Path, spec: dict, *args: str) -> subprocess.CompletedProcess:
    p = tmp / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    return subprocess.run([sys.executable, "-m", "flows.cli", "plan", str(p), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("extra,field", [
    ({"schedule": "searchh"}, "method.settings.schedule"),
    ({"schedule": "search", "search": {"ffn_multiple": 0}}, "method.settings.search.ffn_multiple"),
    ({"schedule": "search", "search": {"drop_blocks": True}, "method": {"name": "flap", "settings": {}}},
     "search.drop_blocks"),  # FLAP's compensation bias has no place in a whole-block-free layer
    ({"schedule": "search", "search": {"gird": 4}}, "method.settings.search.gird"),
    ({"schedule": "search", "budget": {"memory_mb": "lots"}}, "method.settings.budget.memory_mb"),
    ({"schedule": "search", "budget": {"memory_mb": 1, "seq": 3}}, "method.settings.budget.seq"),
    ({"schedule": "search", "budget": 5}, "budget"),
    ({"budget": {"memory_mb": 1}}, "budget"),
    ({"schedule": "search", "budget": {"memory_mb": 1}, "params": "1M"}, "budget"),
])
def test_bad_search_fields_are_one_line_exit_2(tiny_spec, tmp_path, extra, field):
    spec = {**tiny_spec, "method": {"name": "slimgpt", "settings": {}}, **extra}
    spec.pop("ratio")
    r = _cli(tmp_path, spec)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "accepted" in lines[0], r.stderr


def test_a_sweep_builds_the_tables_once_for_its_ratios(prefect_harness, tiny_spec, pf_home):
    from flows.sweep import run_sweep

    spec = {**tiny_spec, "schedule": "search", "search": {"kl_blocks": 2, "ffn_multiple": 4}}  # wanda, per_group
    res = run_sweep(spec, ["wanda"], [0.2, 0.4], "sequential")
    c = res["step_counts"]
    assert c["layer_tables"] == {"miss": 1, "hit": 0} and c["prune"] == {"miss": 2, "hit": 0}
    rows = sorted(res["rows"], key=lambda r: r["ratio"])
    assert rows[0]["params_after"] > rows[1]["params_after"]


def test_the_search_on_a_dask_cluster_gives_the_same_checkpoints(prefect_harness, tiny_spec, pf_home, tmp_path,
                                                                 monkeypatch):
    """The same searched sweep, once with the sequential runner and once on a (local, threaded) Dask cluster,
    each into its own store: the tables are built once per run and the pruned checkpoints are the same bytes
    (the store names objects by their content)."""
    from flows.sweep import run_sweep

    monkeypatch.setenv("PRUNEFLOW_DASK_PROCESSES", "0")
    monkeypatch.setenv("PRUNEFLOW_DASK_WORKERS", "2")
    spec = {**tiny_spec, "schedule": "search", "search": {"kl_blocks": 2}}
    seq = run_sweep(spec, ["wanda"], [0.2, 0.4], "sequential")
    dask = run_sweep({**spec, "store": {"url": str(tmp_path / "dask-store")}}, ["wanda"], [0.2, 0.4], "dask")
    for res in (seq, dask):
        assert res["step_counts"]["layer_tables"] == {"miss": 1, "hit": 0}, res["step_counts"]
        assert res["step_counts"]["prune"] == {"miss": 2, "hit": 0}

    def weights(res):  # ratio -> the checkpoint's tensors (its plan file also holds timings, which differ)
        from safetensors.torch import load_file

        out = {}
        for r in res["rows"]:
            files = sorted(Path(r["checkpoint"]).glob("*.safetensors"))
            assert files, r["checkpoint"]
            out[r["ratio"]] = {k: v for f in files for k, v in load_file(str(f)).items()}
        return out

    a, b = weights(seq), weights(dask)
    assert sorted(a) == sorted(b) == [0.2, 0.4]
    for ratio in a:
        assert a[ratio].keys() == b[ratio].keys()
        assert all(torch.equal(a[ratio][k], b[ratio][k]) for k in a[ratio]), ratio
    assert a[0.2]["model.layers.0.mlp.up_proj.weight"].shape != a[0.4]["model.layers.0.mlp.up_proj.weight"].shape \
        or a[0.2]["model.layers.1.mlp.up_proj.weight"].shape != a[0.4]["model.layers.1.mlp.up_proj.weight"].shape
    assert str(tmp_path / "dask-store") in dask["rows"][0]["checkpoint"]


def test_whole_blocks_run_through_the_pipeline(prefect_harness, tiny_spec):
    """`search.drop_blocks` end to end: at 50 % with `min_ffn: 64` width alone cannot meet the budget, so the
    searched plan removes whole sub-blocks; prune, save, evaluation and report run on it, the budget holds."""
    rep = compress(spec=_search_spec(tiny_spec, ratio=0.5, search={"kl_blocks": 2, "drop_blocks": True, "min_ffn": 64}))
    notes = rep["plan_notes"]["search"]
    assert notes["drop_attn"] or notes["drop_ffn"], notes
    cfg = yaml.safe_load((Path(tiny_spec["model"]["ref"]) / "config.json").read_text())
    ch = 3 * cfg["hidden_size"]  # one FFN channel's parameters
    dec = rep["decoder_params_before"]
    assert abs(rep["removed_decoder_fraction"] * dec - 0.5 * dec) <= ch / 2 + 1, rep["removed_decoder_fraction"]
    # the checkpoint holds the searched blocks: zero-width MLPs / attention-free layers, as the solve planned
    from pruning_core.checkpoint import load_pruned

    ck = Path(rep["artifacts"]["checkpoint_local"])
    layers = yaml.safe_load((ck / "config.json").read_text())["pruneflow_layers"]
    for i in notes["drop_ffn"]:
        assert layers[i]["ffn"] == 0, layers[i]
    for i in notes["drop_attn"]:
        assert layers[i]["n_heads"] == 0 or layers[i]["kind"] != "decoder", layers[i]
    model, _ = load_pruned(ck)
    assert sum(p.numel() for p in model.parameters()) == rep["params_after"] == notes["params_after"]
    assert torch.isfinite(torch.tensor(rep["metrics_after"]["ppl"]))
