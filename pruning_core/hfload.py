"""Building Hugging Face models, one at a time per process.

`from_pretrained` swaps class attributes for the duration of a load (`PreTrainedModel.tie_weights` and
the `torch.nn.init` functions, transformers' `no_tie_weights` / `no_init_weights`) and puts back what
it found when it ends. Two loads in threads of one process (Prefect's thread-pool task runner, a
threaded Dask worker) interleave those saves and restores and can leave the attributes swapped for
good: every later model of the process then has an untied `lm_head` left on the meta device, and
skipped weight initialisation. So every model pruneflow builds goes through `from_pretrained` /
`from_config` here, which hold one process-wide lock.
"""

from __future__ import annotations

import threading
from typing import Any

BUILD_LOCK = threading.RLock()


def from_pretrained(cls: Any, *args: Any, **kwargs: Any):
    with BUILD_LOCK:
        return cls.from_pretrained(*args, **kwargs)


def from_config(cls: Any, config: Any, **kwargs: Any):
    with BUILD_LOCK:
        return cls.from_config(config, **kwargs)
