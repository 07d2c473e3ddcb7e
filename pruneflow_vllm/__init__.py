"""pruneflow's vLLM plugin: serves every checkpoint pruneflow writes, with a plain `vllm serve <folder>`.

Installed with the `serve` extra (`pip install pruneflow[serve]`; here `make serve-env` installs it into
.venv-serve), vLLM finds it through the `vllm.general_plugins` entry point and calls `register`, which
adds the architecture `PruneflowLlamaForCausalLM` (`pruneflow_vllm.model`) to vLLM's `ModelRegistry`.
`pruneflow export` names that architecture in a folder's config.json when neither the stock format
(uniform layers) nor vLLM's DeciLM format (one query-head count for every layer) can hold the result.

This package imports nothing of pruneflow's own (it runs inside vLLM's environment, which has none of
pruneflow's dependencies) and imports vLLM only when vLLM calls it.
"""

ARCH = "PruneflowLlamaForCausalLM"


def register() -> None:
    """vLLM's general-plugin hook: may run several times, in every vLLM process."""
    from vllm import ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCH, "pruneflow_vllm.model:PruneflowLlamaForCausalLM")
