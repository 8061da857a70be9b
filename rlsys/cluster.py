"""Joining or starting the Ray cluster a run uses.

A run joins `cluster.address` or `RAY_ADDRESS` when given (a GPU cluster, or `ray job submit`),
otherwise it starts a private local head inside the driver process (its own temp dir and
random ports, so it never touches another Ray on the machine and dies with the driver — never
`ray stop`, which would kill every Ray here).
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile

from rlsys.config import ClusterConfig

log = logging.getLogger(__name__)

# Variables every actor needs before its first import of torch/vLLM/DeepSpeed.
ACTOR_ENV_DEFAULTS = {
    "TOKENIZERS_PARALLELISM": "false",
    # vLLM's and torch's start-up warnings drown the progress bar; errors still show.
    "VLLM_LOGGING_LEVEL": "ERROR",
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
    "TORCH_EXTENSIONS_DIR": os.path.expanduser("~/.cache/rlsys/torch_extensions"),
    "RAY_DEDUP_LOGS": "1",
}


def free_port() -> int:
    """A TCP port free right now on this host (for process-group rendezvous)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


_started_here = False


def connect(cfg: ClusterConfig) -> None:
    """ray.init: join an existing cluster or start a private local head. Inside a process
    where Ray is already initialised (a notebook, a test session) that Ray is used as is."""
    import ray

    global _started_here
    if ray.is_initialized():
        log.info("using the Ray this process is already connected to")
        return
    _started_here = True
    for k, v in ACTOR_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return
    # Socket paths must stay short (<108 bytes), hence a short temp dir under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="rlsys-ray-", dir="/tmp")
    log.info("starting a local Ray head (%d logical CPUs, temp dir %s)", cfg.num_cpus, temp_dir)
    ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, _temp_dir=temp_dir,
             object_store_memory=int(cfg.object_store_gib * (1 << 30)), log_to_driver=True,
             configure_logging=False)


def shutdown() -> None:
    """Disconnect what `connect` connected (a Ray that was there before is left running)."""
    import ray

    global _started_here
    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False
