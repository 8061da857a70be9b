"""DeepSpeedLearner ranks (two by default) in a private local Ray, plus a weight-sync receiver in
the test process: the fixture body the learner tests share."""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from typing import Iterator

CACHE = os.path.expanduser("~/.cache/rlsys")


@contextmanager
def learner_ranks(model_dir: str, lc, ac, prefix: str = "rlsys-lt-", world: int = 2,
                  dtype: str | None = None) -> Iterator[dict]:
    """Yields {"learners": [`world` actors], "transport": the receiving end of their weight group};
    `dtype`: the weights' (None: the checkpoint's)."""
    import ray

    from learners.deepspeed_learner import DeepSpeedLearner
    from rlsys.cluster import free_port
    from rlsys.weight_sync import make_transport

    temp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths are limited
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.path.join(CACHE, "torch_extensions")}
    ray.init(num_cpus=8, include_dashboard=False, _temp_dir=temp, runtime_env={"env_vars": env},
             log_to_driver=False)
    learners, receiver = [], {}
    try:
        cls = ray.remote(num_cpus=1)(DeepSpeedLearner)
        port, sync_port = free_port(), free_port()
        learners = [cls.remote(r, world, "127.0.0.1", port, model_dir, lc, ac, 0, dtype) for r in range(world)]
        # Weight-sync group: the learners' rank 0 + one receiver here, joining concurrently.
        # A daemon: if a rank dies before it joins, the receiver's store connect waits out its
        # own timeout (10 min), and it must not keep the test process alive for it.
        th = threading.Thread(target=lambda: receiver.update(
            transport=make_transport("127.0.0.1", sync_port, 1, 2, "gloo", "cpu")), daemon=True)
        th.start()
        ray.get([lr.init_weight_sync.remote("127.0.0.1", sync_port, 2, "gloo") for lr in learners])
        th.join(60)
        yield {"learners": learners, **receiver}
    finally:
        # shutdown is local to each rank, so one rank at a time is fine.
        for lr in learners:
            try:
                ray.get(lr.shutdown.remote(), timeout=60)
            except Exception as e:  # a rank already gone: nothing left to close
                print(f"learner shutdown: {type(e).__name__}: {e}")
            ray.kill(lr)
        if "transport" in receiver:
            receiver["transport"].close()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
