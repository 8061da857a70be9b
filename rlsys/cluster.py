"""Joining or starting the Ray cluster a run uses.

A run joins `cluster.address` or `RAY_ADDRESS` when given (a GPU cluster, or `ray job submit`),
otherwise it starts a private local head inside the driver process (its own temp dir and
random ports, so it never touches another Ray on the machine and dies with the driver — never
`ray stop`, which would kill every Ray here).
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import tempfile
import threading

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


RENDEZVOUS_PORTS_FROM = 20000
"""free_port's lowest port: above Ray's worker ports (10002-19999 by default)."""


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux's default when
    unreadable)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free right now on this host, for a process-group rendezvous that a rank binds
    seconds later. Taken outside the kernel's ephemeral range where there is room: a port the
    kernel hands out itself can be given to any outgoing connection in the meantime (Ray's
    workers open many while the ranks start), and the rank's bind then fails with EADDRINUSE,
    as a CI run of a ZeRO-3 test did."""
    lo, hi = ephemeral_port_range()
    ranges = [r for r in (range(RENDEZVOUS_PORTS_FROM, lo), range(max(hi + 1, RENDEZVOUS_PORTS_FROM), 65536))
              if len(r) >= 1000]
    pick = random.SystemRandom()
    for _ in range(64 if ranges else 0):
        r = pick.choice(ranges)
        port = pick.randrange(r.start, r.stop)
        if _bindable(port):
            return port
    with socket.socket() as s:   # no room outside the range, or all taken: the kernel's pick
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
        with _keep_sigterm_handler():
            ray.init(address=address, log_to_driver=True)
        return
    # Socket paths must stay short (<108 bytes), hence a short temp dir under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="rlsys-ray-", dir="/tmp")
    log.info("starting a local Ray head (%d logical CPUs, temp dir %s)", cfg.num_cpus, temp_dir)
    with _keep_sigterm_handler():
        # No idle workers kept: Ray keeps up to one per logical CPU for plain tasks, but the
        # run's only tasks are a few at start-up and every actor gets a worker of its own (its
        # own env vars), so they would only hold memory (3-4 of them, 0.38 GiB, in
        # benchmarks/e2e_vs_trl.py). A task still gets a worker when it is submitted.
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, _temp_dir=temp_dir,
                 object_store_memory=int(cfg.object_store_gib * (1 << 30)), log_to_driver=True,
                 configure_logging=False,
                 _system_config={"prestart_worker_first_driver": False, "enable_worker_prestart": False,
                                 "num_workers_soft_limit": 0})


@contextlib.contextmanager
def _keep_sigterm_handler():
    """ray.init installs a native SIGTERM handler in the driver that prints a stack trace and
    aborts, skipping every cleanup; the caller's Python handler (the CLI's graceful stop) is put
    back after it."""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(previous) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def shutdown() -> None:
    """Disconnect what `connect` connected (a Ray that was there before is left running)."""
    import ray

    global _started_here
    if _started_here and ray.is_initialized():
        ray.shutdown()
    _started_here = False


class ActorFailure(RuntimeError):
    """An actor died or stopped answering: which one, where, and during what."""


class PlacementError(RuntimeError):
    """The cluster cannot hold what the run asks for: what is missing."""


class ActorDirectory:
    """Names and nodes of a run's actors, so a failure says "learner rank 1 on 10.0.0.3"
    rather than an actor id."""

    def __init__(self):
        self._by_id: dict[str, str] = {}
        self._places: dict[str, tuple[str, tuple[str, ...]]] = {}

    def add(self, actor, name: str) -> None:
        self._by_id[actor._actor_id.hex()] = name

    def locate(self, actors: list, timeout: float) -> None:
        """Record each (ready) actor's node address beside its name, and its place: the address
        and the GPU ids Ray assigned it (the weight-sync backend depends on who shares a GPU)."""
        import ray

        places = ray.get([a.__ray_call__.remote(lambda self: (
            ray.util.get_node_ip_address(),
            tuple(str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", []))))
            for a in actors], timeout=timeout)
        for a, (ip, gpus) in zip(actors, places):
            key = a._actor_id.hex()
            self._places[key] = (ip, gpus)
            self._by_id[key] = f"{self._by_id.get(key, 'actor ' + key[:8])} on node {ip}" + (
                f" (GPU {','.join(gpus)})" if gpus else "")

    def place(self, actor) -> tuple[str, tuple[str, ...]]:
        """(node address, GPU ids) of a located actor."""
        return self._places[actor._actor_id.hex()]

    def name(self, actor_id: str | None) -> str:
        return self._by_id.get(actor_id or "", f"actor {str(actor_id)[:8]}")


def get_with_deadline(refs, what: str, timeout_s: float, actors: ActorDirectory | None = None,
                      reraise: tuple = ()):
    """ray.get with a deadline. A timeout or a dead actor becomes an ActorFailure naming the
    call (`what`), the deadline's config key and, for a death, the actor and its node.
    Exceptions of the types in `reraise` pass through unchanged (the caller recovers)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        return ray.get(refs, timeout=timeout_s)
    except reraise:
        raise
    except GetTimeoutError:
        raise ActorFailure(f"{what}: no answer within {timeout_s:.0f}s (cluster.actor_timeout_s); an actor is "
                           "hung or the cluster is overloaded") from None
    except RayActorError as e:
        who = actors.name(getattr(e, "actor_id", None)) if actors else "an actor"
        cause = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ActorFailure(f"{what}: {who} died ({cause})") from e


def placement_shortfall(bundles: list[dict[str, float]], available: dict[str, float]) -> dict[str, tuple]:
    """{resource: (asked in total, available)} for every resource the bundles need more of
    than `available` has (a necessary condition; fragmentation aside)."""
    asked: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            asked[k] = asked.get(k, 0.0) + v
    return {k: (v, available.get(k, 0.0)) for k, v in asked.items() if v > available.get(k, 0.0) + 1e-9}


def check_local_head_fits(demands: list[tuple[str, int, dict[str, float]]]) -> None:
    """On a local head we started (it never grows), refuse at once a run whose actors cannot
    all be placed, naming what is missing; a joined cluster may autoscale, so it is not checked."""
    import ray

    if not _started_here:
        return
    short = placement_shortfall([need for _, n, need in demands for _ in range(n)], ray.cluster_resources())
    if short:
        asked = "; ".join(f"{n} x {kind} {need}" for kind, n, need in demands)
        raise PlacementError(f"this local Ray head cannot hold the run's actors ({asked}): {_describe(short)}. "
                             "Raise cluster.num_cpus, or lower the actors' num_cpus/num_gpus")


def wait_for_placement(pg, bundles: list[dict[str, float]], timeout_s: float, what: str) -> None:
    """Wait for a placement group; one the cluster cannot hold raises a PlacementError with
    resources asked vs. available after `timeout_s` instead of waiting forever (on a local head,
    which never grows, `check_local_head_fits` has already refused such a run at once)."""
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import remove_placement_group

    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except GetTimeoutError:
        short = placement_shortfall(bundles, ray.available_resources())
        remove_placement_group(pg)
        raise PlacementError(f"{what}: not placed within {timeout_s:.0f}s (cluster.placement_timeout_s); "
                             f"asked {bundles}; " + (_describe(short) if short else
                                                     "enough in total but not on one node set as asked")) from None


def _describe(short: dict[str, tuple]) -> str:
    return ", ".join(f"{k}: asked {a:g}, available {v:g}" for k, (a, v) in sorted(short.items()))


def _paths_missing_here(paths: list[str]) -> tuple[str, list[str]]:
    import ray

    return ray.util.get_node_ip_address(), [p for p in paths if not os.path.exists(p)]


def check_paths_on_every_node(paths: list[str], timeout_s: float = 120.0) -> None:
    """Every path the actors read (model directory, data, reward-function files) must exist on
    every node that may host one: on a multi-node cluster they belong on shared storage (or are
    materialised at the same path on each node). Raises FileNotFoundError naming node and path."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    if len(nodes) < 2:  # one node: the driver's own checks already saw these paths
        return
    probe = ray.remote(num_cpus=0)(_paths_missing_here)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths)
            for n in nodes]
    missing = [(ip, m) for ip, m in ray.get(refs, timeout=timeout_s) if m]
    if missing:
        raise FileNotFoundError("paths the actors read are missing on some nodes (put them on shared storage, "
                                "or at the same path on every node): "
                                + "; ".join(f"node {ip}: {', '.join(m)}" for ip, m in missing))
