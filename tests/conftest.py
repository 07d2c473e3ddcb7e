"""Shared fixtures: a temporary PRUNEFLOW_HOME, a tiny random Llama saved as a local HF folder (with a
small real BPE tokenizer), a moto S3 server on 127.0.0.1 (started and stopped by its PID), and a
Prefect test harness (ephemeral API with a temporary database) for tests that run flows in-process.

Other engineers: add fixtures below with additive edits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "AWS_EC2_METADATA_DISABLED": "true",
    "TOKENIZERS_PARALLELISM": "false",
}
for _k, _v in OFFLINE_ENV.items():
    os.environ.setdefault(_k, _v)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop_pid(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process we started (and its process group), by PID."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.wait(timeout=5)


@pytest.fixture(autouse=True)
def _environment_restored():
    """Every test ends with the environment it started with: the CLI, run in-process by CliRunner, sets
    process-wide variables (`--quiet` sets TQDM_DISABLE=1), which leaked into later tests' subprocesses
    (the console test saw no bars after one)."""
    before = dict(os.environ)
    yield
    for k in set(os.environ) - set(before):
        del os.environ[k]
    for k, v in before.items():
        if os.environ.get(k) != v:
            os.environ[k] = v


@pytest.fixture
def pf_home(tmp_path, monkeypatch) -> Path:
    """A fresh PRUNEFLOW_HOME for the test (artifacts, runs, models, caches)."""
    home = tmp_path / "pfhome"
    home.mkdir()
    monkeypatch.setenv("PRUNEFLOW_HOME", str(home))
    monkeypatch.setenv("PRUNEFLOW_QUIET", "1")
    from tasks import store

    store._STORES.clear()
    return home


def write_tiny_llama(d: Path, **config) -> Path:
    """A tiny random Llama + a 320-token BPE tokenizer (trained on the pydoc text), as a HF folder in `d`.
    `config`: LlamaConfig fields over the defaults (GQA 4 q / 2 kv heads of 16, 2 layers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pruning_core.data import load_text

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([load_text("pydoc", "train")[:60_000]], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(d)
    import torch

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**dict(vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                tie_word_embeddings=False), **config})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (GQA 4 q / 2 kv heads, 2 layers) + a 320-token BPE tokenizer, as a HF folder."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_spec(tiny_llama_dir, pf_home) -> dict:
    """A run spec for the tiny model: fast everywhere, tracking off."""
    return {
        "name": "tiny",
        "model": {"ref": str(tiny_llama_dir)},
        "calibration": {"n_samples": 4, "seq_len": 32, "seed": 0},
        "method": {"name": "wanda", "settings": {"gqa": "per_group"}},
        "ratio": 0.5,
        "evaluation": {"ppl_seq_len": 32, "ppl_windows": 4},
        "store": {"url": str(pf_home / "artifacts")},
        "tracking": {"enabled": False},
        "device": "cpu",
    }


@pytest.fixture(scope="session")
def moto_s3():
    """A real S3 API: `moto_server` on 127.0.0.1 (random port), stopped by its PID at the end.

    Yields the env vars a client needs; tests set them with monkeypatch (see `s3_env`)."""
    port = free_port()
    exe = VENV_BIN / "moto_server"
    if not exe.exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"moto-{port}.log", "wb")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/", timeout=30)
        yield {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    finally:
        stop_pid(proc)
        log.close()


@pytest.fixture
def s3_env(moto_s3, monkeypatch):
    """moto's env set for this test, plus a fresh bucket; yields an s3:// store URL."""
    import uuid

    for k, v in moto_s3.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    import s3fs

    bucket = f"pf-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto_s3["AWS_ENDPOINT_URL"]}, skip_instance_cache=True)
    fs.mkdir(bucket)
    yield f"s3://{bucket}/pruneflow"


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """Prefect's test harness (temporary API + database) for in-process flow runs."""
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a 2-core machine: one torch thread avoids OpenMP spin contention (much faster).
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_terminal_summary(terminalreporter, config):
    """Print pytest-randomly's seed at the end too (-q hides the header line that names it)."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int) and config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line(f"pytest-randomly seed: {seed} (replay this order: make test-random SEED={seed})")
