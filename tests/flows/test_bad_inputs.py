"""Every user error through the real command line: exactly one line on stderr, exit code 2, nothing else.

More than 40 bad inputs — spec fields, files, options, models, texts, devices, lm-eval tasks, targets —
each run as its own process through `flows.cli:main` (the `pruneflow` entry point). So that the test
stays fast on a small machine, one driver process imports the command line once and forks a child per
case; the child runs `main()` with the case's argv, its stdout/stderr going to files, exactly as a fresh
`pruneflow ...` would (a handful of cases also run as plain `python -m flows.cli` processes). Errors that
can be known before computing must be raised before Prefect is imported, and nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

DRIVER = textwrap.dedent('''
    import json, os, sys
    import flows.cli, flows.preflight, flows.spec, pruning_core.methods  # imported once, before the forks
    from pruning_core.methods import list_methods
    list_methods()
    cases = json.load(open(sys.argv[1]))
    out = []
    for i, argv in enumerate(cases):
        err_path, out_path = f"{sys.argv[2]}/{i}.err", f"{sys.argv[2]}/{i}.out"
        pid = os.fork()
        if pid == 0:
            fe, fo = os.open(err_path, os.O_WRONLY | os.O_CREAT), os.open(out_path, os.O_WRONLY | os.O_CREAT)
            os.dup2(fe, 2); os.dup2(fo, 1)
            sys.argv = ["pruneflow", *argv]
            code = 0
            try:
                flows.cli.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                import traceback; traceback.print_exc(); code = 99
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.append({"argv": argv, "rc": os.waitstatus_to_exitcode(status),
                    "err": open(err_path).read(), "out": open(out_path).read()})
    json.dump(out, open(sys.argv[3], "w"))
''')


def _cases(tmp: Path, tiny: Path) -> list[tuple[list[str], str]]:
    """(argv, text the one line must contain)."""
    def spec(name: str, text: str) -> str:
        p = tmp / name
        p.write_text(text)
        return str(p)

    no_config = tmp / "no_config"
    no_config.mkdir()
    gpt2 = tmp / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    csv = tmp / "text.csv"
    csv.write_text("a,b\n1,2\n")
    short = tmp / "short.txt"
    short.write_text("Only a few words here.\n")
    m = ["--model", str(tiny)]
    truncated, garbage = tmp / "truncated", tmp / "garbage"
    for d in (truncated, garbage):
        shutil.copytree(tiny, d)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (garbage / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file " * 64)
    return [
        # the spec: values, names, keys, types
        (["run", "--ratio", "1.5"], "ratio"),
        (["run", "--ratio", "-0.1"], "ratio"),
        (["run", "--ratio", "abc"], "--ratio"),
        (["run", "--method", "nope"], "method.name"),
        (["run", "--set", "method.settings.gqa=sideways"], "method.settings.gqa"),
        (["run", "--method", "llm-rank", "--set", "method.settings.gqa=per_group"], "method.settings.gqa"),
        (["run", "--set", "calibration.n_sample=8"], "calibration.n_sample"),
        (["run", "--set", "modle.ref=x"], "modle"),
        (["run", "--set", "calibration.n_samples=many"], "calibration.n_samples"),
        (["run", "--set", "calibration.n_samples=0"], "calibration.n_samples"),
        (["run", "--set", "calibration.seq_len=1"], "calibration.seq_len"),
        (["run", "--set", "tracking.on_failure=explode"], "tracking.on_failure"),
        (["run", "--set", "model.dtype=int3"], "model.dtype"),
        (["run", "--set", "evaluation.limit=0"], "evaluation.limit"),
        (["run", "--set", "evaluation.ppl_seq_len=1"], "evaluation.ppl_seq_len"),
        (["run", "--set", "ratio"], "--set"),
        (["run", "--set", "schedule=zigzag"], "schedule"),
        (["run", "--set", "recovery.kind=magic"], "recovery.kind"),
        (["run", "--set", "recovery.kind=replacement"], "recovery.kind"),
        (["run", "--method", "llm-streamline", "--set", "method.settings.replacement=none", "--set",
          "recovery.kind=replacement"], "recovery.kind"),
        (["run", "--set", "recovery.kind=lora", "--set", "recovery.settings.rank=0"], "rank"),
        (["run", "--device", "tpu"], "device"),
        (["run", "--device", "cuda"], "device"),
        (["run", "--device", "cuda:7"], "device"),
        # spec files
        (["run", str(tmp / "absent.yaml")], "spec"),
        (["run", spec("bad.yaml", "model: [unclosed\n")], "valid YAML"),
        (["run", spec("list.yaml", "- a\n- b\n")], "spec"),
        (["run", spec("keys.yaml", "calibration: {n_sampels: 4}\n")], "calibration.n_sampels"),
        # the model
        (["run", "--model", str(tmp / "absent_model")], "model"),
        (["run", "--model", str(no_config)], "config.json"),
        (["run", "--model", str(gpt2)], "gpt2"),
        (["run", "--model", str(broken)], "config.json"),
        (["run", "--model", "someorg/somemodel"], "offline"),
        (["plan", "--model", str(gpt2)], "gpt2"),
        # texts, calibration size, lm-eval tasks
        (["run", *m, "--set", "calibration.n_samples=5000"], "calibration.n_samples"),
        (["run", *m, "--set", f"calibration.source={short}", "--set", "calibration.seq_len=64"],
         "calibration.n_samples"),
        (["run", *m, "--set", f"calibration.source={tmp / 'absent.txt'}"], "calibration.source"),
        (["run", *m, "--set", "calibration.source=hf:wikitext"], "calibration.source"),
        (["run", *m, "--set", f"calibration.source={csv}"], "calibration.source"),
        (["run", *m, "--set", f"evaluation.source={tmp / 'absent.txt'}"], "evaluation.source"),
        (["run", *m, "--set", "evaluation.tasks=[no_such_task]"], "evaluation.tasks"),
        (["run", *m, "--set", "evaluation.tasks=[boolq]"], "evaluation.tasks"),
        (["plan", *m, "--set", "evaluation.tasks=[no_such_task]"], "evaluation.tasks"),
        # targets
        (["run", *m, "--params", "lots"], "params"),
        (["run", *m, "--params", "1"], "params"),
        (["run", *m, "--params", "500M"], "params"),
        (["plan", *m, "--params", "1k"], "params"),
        (["run", *m, "--method", "shortgpt", "--ratio", "0.9"], "ratio"),
        (["run", *m, "--method", "llm-streamline", "--set", "method.settings.n_layers=2"], "n_layers"),
        # store, options, commands
        (["run", *m, "--store", "/proc/pruneflow-store"], "store"),
        (["run", "--bogus"], "--bogus"),
        (["frobnicate"], "frobnicate"),
        (["sweep", "--ratios", "a,b"], "--ratios"),
        (["sweep", "--task-runner", "rocket"], "--task-runner"),
        (["report", "no-such-run"], "run"),
        # issue 23: a run name is one folder inside $PRUNEFLOW_HOME/runs; broken weight files; one target;
        # promote / rollback of a model that does not exist print their line only
        (["run", *m, "--name", "../../escape"], "name"),
        (["run", *m, "--name", "a/b"], "name"),
        (["run", "--model", str(truncated)], "model.safetensors"),
        (["run", "--model", str(garbage)], "model.safetensors"),
        (["plan", "--model", str(truncated)], "model.safetensors"),
        (["run", *m, "--params", "100k", "--ratio", "0.3"], "params"),
        (["run", *m, "--params", "100k", "--set", "ratio=0.3"], "params"),
        (["promote", "no-such-model"], "model"),
        (["rollback", "no-such-model"], "model"),
    ]


def test_forty_plus_bad_inputs_each_one_line_exit_2(tmp_path, tiny_llama_dir, pf_home):
    import torch

    cases = _cases(tmp_path, tiny_llama_dir)
    if torch.cuda.is_available():  # `--device cuda` is then not an error
        cases = [c for c in cases if not (len(c[0]) > 2 and c[0][1] == "--device" and c[0][2] == "cuda")]
    assert len(cases) >= 40
    (tmp_path / "cases.json").write_text(json.dumps([a for a, _ in cases]))
    outs = tmp_path / "outs"
    outs.mkdir()
    env = {**os.environ, "PRUNEFLOW_HOME": str(pf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    drv = tmp_path / "driver.py"
    drv.write_text(DRIVER)
    subprocess.run([sys.executable, str(drv), str(tmp_path / "cases.json"), str(outs), str(tmp_path / "res.json")],
                   cwd=REPO, env=env, check=True, timeout=900)
    results = json.loads((tmp_path / "res.json").read_text())
    bad = []
    for (argv, needle), r in zip(cases, results):
        err = r["err"].strip()
        ok = (r["rc"] == 2 and err.startswith("error: ") and "\n" not in err and needle in err
              and "Traceback" not in r["err"] + r["out"] and not r["out"].strip())
        if not ok:
            bad.append((argv, r["rc"], r["err"][-600:], r["out"][-200:]))
    assert not bad, "\n".join(map(str, bad))
    assert not (pf_home / "runs").exists()  # nothing half-written
    assert not (tmp_path / "escape").exists() and not (pf_home / "escape").exists()  # nothing outside the home
    assert not list((tmp_path / "prefect").rglob("*.db"))  # Prefect's server never started (no database)


@pytest.mark.parametrize("value", ["soon", "0", "2.5"])
def test_a_bad_s3_timeout_is_one_line(value, pf_home, tiny_llama_dir):
    env = {**os.environ, "PRUNEFLOW_HOME": str(pf_home), "HF_HUB_OFFLINE": "1", "PRUNEFLOW_S3_TIMEOUT": value}
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--model", str(tiny_llama_dir)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == "", r.stderr[-2000:]
    assert r.stderr.startswith("error: PRUNEFLOW_S3_TIMEOUT") and r.stderr.count("\n") == 1, r.stderr[-2000:]


@pytest.mark.parametrize("argv", [["run", "--ratio", "abc"], ["run", "--set", "calibration.n_samples=0"],
                                  ["run", "--device", "tpu"]])
def test_plain_processes_too(argv, pf_home, tmp_path):
    env = {**os.environ, "PRUNEFLOW_HOME": str(pf_home), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
