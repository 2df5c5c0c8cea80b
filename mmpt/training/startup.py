"""Third-party start-up: chatter shown only with ``--debug``, and work DeepSpeed does that training never uses.

Without this every command printed three lines: DeepSpeed's ``Setting accelerator to CPU`` (a warning
logged while ``import deepspeed`` runs), torch's ``No CUDA runtime is found`` and DeepSpeed's
``deepspeed_shm_comm_op built successfully`` (both from building the shared-memory op below). Measured
with bench/startup.py.
"""

from __future__ import annotations

import importlib
import logging

# Loggers whose records below ERROR are start-up noise to a user: DeepSpeed's own, and torch's C++
# extension builder (it warns about CUDA_HOME on every JIT build, CUDA or not).
CHATTY_LOGGERS = ("DeepSpeed", "torch.utils.cpp_extension")


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_third_party(debug: bool = False) -> None:
    """Drop the chatty loggers' records below ERROR unless ``debug``. A filter on the logger, not a level:
    DeepSpeed sets its logger's level when imported, a filter stays."""
    for name in CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        if debug:
            logger.removeFilter(_errors_only)
        elif _errors_only not in logger.filters:
            logger.addFilter(_errors_only)


def skip_shm_comm_op() -> None:
    """Make DeepSpeed's comm backend skip its shared-memory all-reduce op on CPU.

    ``deepspeed.init_distributed`` JIT-compiles it (~45 s with 2 cores the first time on a machine, a
    compiler probe and a reload on every start after) for ``inference_all_reduce`` only, which serves
    tensor-parallel inference and falls back to the process group's all-reduce without the op; training
    never calls it. A DeepSpeed without the hook is left as it is.
    """
    # not `import deepspeed.comm.torch as m`: deepspeed.comm re-exports torch under that attribute name
    backend = importlib.import_module("deepspeed.comm.torch")
    if callable(getattr(backend, "build_shm_op", None)):
        backend.build_shm_op = lambda: None

