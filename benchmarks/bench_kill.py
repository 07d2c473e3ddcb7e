"""Kill or signal a real `pruneflow run` mid-prune and mid-upload, rerun it, and count what is left behind.

    .venv/bin/python benchmarks/bench_kill.py                   # prune and upload, prints one table
    .venv/bin/python benchmarks/bench_kill.py sigint spill      # any of: prune upload sigint sigterm spill

Each scenario: a fresh PRUNEFLOW_HOME / PREFECT_HOME / TMPDIR, a random Llama (hidden 256, 4 layers,
~33 MB of fp32 weights, so that its checkpoint goes up to S3 as a multipart upload of 5 MiB parts),
one `pruneflow run` killed with SIGKILL on the run process alone (as the OOM killer does; its
temporary Prefect server is orphaned), then a second `pruneflow run` of the same spec. Counted after
the kill (and a few seconds for the run's watchdog) and after the rerun: torn temporary folders in
the local store, `pruneflow-*` folders in $TMPDIR, process journals, incomplete S3 multipart uploads,
living Prefect servers started by the killed run, and Prefect flow runs by state.

* prune: a local store; killed at the checkpoint's commit (fault point), after its files are written.
* upload: an S3 store (moto on 127.0.0.1); killed as soon as moto logs the checkpoint's
  CreateMultipartUpload, while its parts are going up.
* sigint / sigterm: as prune, but SIGINT (started as a background job: SIGINT ignored at start) or
  SIGTERM instead of SIGKILL; the run's exit code is shown.
* spill: SlimGPT under `model.placement: disk` with $PRUNEFLOW_SCRATCH set, SIGKILL after its last
  layer, while the layers it rewrote are spilled.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(d: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pruning_core.data import load_text

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([load_text("pydoc", "train")[:60_000]], trainer=trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=256, intermediate_size=2048, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _env(root: Path, extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PRUNEFLOW_FAULT"))}
    env.update(PRUNEFLOW_HOME=str(root / "home"), PREFECT_HOME=str(root / "prefect"), TMPDIR=str(root / "tmp"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DO_NOT_TRACK="true", PRUNEFLOW_S3_PART_MB="5",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(REPO),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600")
    env.update(extra)
    return env


def _alive(pid: int) -> bool:
    from tasks.journal import pid_alive

    return pid_alive(pid)


def _count(root: Path, env: dict, s3: dict | None, servers: list[int]) -> dict:
    home, tmp = root / "home", root / "tmp"
    out = {
        "store .tmp-*": len(list((home / "artifacts" / "objects").glob("*/.tmp-*"))),
        "$TMPDIR pruneflow-*": len(list(tmp.glob("pruneflow-*"))),
        "$PRUNEFLOW_SCRATCH": len(list((root / "scratch").glob("*"))),
        "journals": len(list((home / "proc").glob("*.json"))),
        "servers alive": sum(_alive(p) for p in servers),
        "multipart open": "-",
        "multipart started / aborted": "-",
    }
    if s3:
        import s3fs

        fs = s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                               client_kwargs={"endpoint_url": s3["AWS_ENDPOINT_URL"]})
        out["multipart open"] = len(fs.call_s3("list_multipart_uploads", Bucket="kill").get("Uploads", []))
        log = (root / "moto.log").read_text(errors="replace")
        started = len(re.findall(r"POST /kill/\S+[?]uploads", log))
        aborted = len(re.findall(r"DELETE /kill/\S+[?]uploadId=", log))
        out["multipart started / aborted"] = f"{started} / {aborted}"
    code = ("from prefect.client.orchestration import get_client\n"
            "from prefect.client.schemas.sorting import FlowRunSort\nimport json, collections\n"
            "with get_client(sync_client=True) as c:\n"
            "    rs = c.read_flow_runs(limit=50, sort=FlowRunSort.START_TIME_DESC)\n"
            "    print(json.dumps(collections.Counter(r.state.type.value for r in rs)))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    states = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"?": p.stderr[-200:]}
    out["flow runs"] = ", ".join(f"{k.lower()} {v}" for k, v in sorted(states.items()))
    return out


def scenario(kind: str) -> list[dict]:
    import yaml

    root = Path(tempfile.mkdtemp(prefix=f"bench-kill-{kind}-"))
    (root / "tmp").mkdir()
    model = _model(root / "model")
    s3 = None
    moto = None
    if kind == "upload":
        port = _port()
        log = open(root / "moto.log", "wb")
        moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        time.sleep(3)
        s3 = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
              "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
        import s3fs

        s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": s3["AWS_ENDPOINT_URL"]},
                          skip_instance_cache=True).mkdir("kill")
    store = "s3://kill/pf" if s3 else str(root / "home" / "artifacts")
    spill = kind == "spill"
    spec = {"name": f"kill-{kind}", "model": {"ref": str(model), "placement": "disk" if spill else "auto"},
            "method": {"name": "slimgpt" if spill else "wanda"}, "ratio": 0.3,
            "calibration": {"n_samples": 4, "seq_len": 32}, "evaluation": {"ppl_seq_len": 32, "ppl_windows": 2},
            "store": {"url": store}, "tracking": {"enabled": False}, "device": "cpu"}
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    cmd = [sys.executable, "-m", "flows.cli", "run", str(root / "spec.yaml"), "--quiet"]
    (root / "scratch").mkdir()
    env = _env(root, {**(s3 or {}), "PRUNEFLOW_SCRATCH": str(root / "scratch")})
    fault = root / "fault"
    point = {"upload": None, "spill": "progress:slimgpt:4"}.get(kind, "commit:checkpoint")
    extra = {"PRUNEFLOW_FAULT": point, "PRUNEFLOW_FAULT_FILE": str(fault)} if point else {}
    sig = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM}.get(kind, signal.SIGKILL)
    proc = subprocess.Popen(cmd, cwd=REPO, env={**env, **extra}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    t0 = time.time()
    while True:
        if point and fault.exists():
            break
        if kind == "upload" and re.search(r'"POST /kill/pf/objects/\S+model\.safetensors\?uploads',
                                          (root / "moto.log").read_text(errors="replace")):
            break
        if proc.poll() is not None or time.time() - t0 > 900:
            raise SystemExit(f"{kind}: the run ended (rc {proc.returncode}) before the kill point")
        time.sleep(0.05)
    jf = next((root / "home" / "proc").glob(f"{proc.pid}.*.json"))
    servers = [json.loads(jf.read_text())["prefect_server"]["pid"]]
    os.kill(proc.pid, sig)
    rc = proc.wait()
    t_kill = time.time()
    while jf.exists() and time.time() - t_kill < 120:  # the watchdog's turn: it drops the journal when done
        time.sleep(0.5)
    rows = [{"scenario": kind, "when": f"after {signal.Signals(sig).name} (rc {rc}; watchdog done in "
                                       f"{time.time() - t_kill:.0f} s)",
             **_count(root, env, s3, servers)}]
    t1 = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    rep = json.loads((root / "home" / "runs" / f"kill-{kind}" / "report.json").read_text()) if p.returncode == 0 else {}
    hits = sum(v == "hit" for v in rep.get("cache", {}).values())
    rows.append({"scenario": kind, "when": f"after rerun (rc {p.returncode}, {hits} hits, {time.time() - t1:.0f} s)",
                 **_count(root, env, s3, servers)})
    if moto is not None:
        os.killpg(moto.pid, signal.SIGTERM)
    return rows


def main() -> None:
    rows = []
    for kind in sys.argv[1:] or ["prune", "upload"]:
        rows += scenario(kind)
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
