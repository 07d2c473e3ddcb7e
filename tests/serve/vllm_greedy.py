"""Runs inside .venv-serve (vLLM's CPU build; not the project's env): greedy tokens from `vllm.LLM`.

    .venv-serve/bin/python tests/serve/vllm_greedy.py JOB.json OUT.json

JOB: {"checkpoints": {name: folder}, "prompts": [[token ids]], "max_tokens": n, "trust_remote_code": [names]}
(only DeciLM folders need remote code; pruneflow's plugin architecture is found through its entry point)
OUT: {name: [[generated token ids] per prompt]} (or {name: {"error": "..."}}), plus "_seconds": {name: s}.
One process, one engine at a time (in-process engine core: VLLM_ENABLE_V1_MULTIPROCESSING=0).
"""

import gc
import json
import os
import sys
import time


def main() -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the tiny models need a few MiB
    job = json.load(open(sys.argv[1]))
    from vllm import LLM, SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=int(job["max_tokens"]), ignore_eos=True, detokenize=False)
    out, seconds = {}, {}
    for name, path in job["checkpoints"].items():
        t0 = time.time()
        try:
            llm = LLM(model=path, skip_tokenizer_init=True, dtype="float32", max_model_len=128, enforce_eager=True,
                      trust_remote_code=name in job.get("trust_remote_code", ()), max_num_seqs=4, seed=0)
            res = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], sp, use_tqdm=False)
            out[name] = [list(r.outputs[0].token_ids) for r in res]
            del llm
        except Exception as e:  # noqa: BLE001 - reported per checkpoint, the test names it
            out[name] = {"error": f"{type(e).__name__}: {e}"}
        gc.collect()
        seconds[name] = round(time.time() - t0, 1)
    out["_seconds"] = seconds
    with open(sys.argv[2], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
