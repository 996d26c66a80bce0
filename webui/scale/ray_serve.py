"""Past one machine: the engine as a Ray Serve deployment (`--ray auto` or `--ray ADDRESS`).

The page, the API, users and their jobs stay in the front process and its one queue. The queue's
workers are *lanes* (`RayLane`, `--ray-max-replicas` of them): a lane sends the job's request to
the deployment through a Serve handle and streams back what the replica reports (its name, each
step's progress and preview, then the result or the error). Serve picks the replica and scales
the replicas between `--ray-min-replicas` and `--ray-max-replicas` on the requests waiting for
them (`target_ongoing_requests=1`: one job a replica at a time, as on a local worker).

- Each replica is a whole engine with one worker (`GenerationReplica`), built from the front's
  settings; on a GPU node it gets one GPU (`num_gpus=1`), else one CPU.
- Interrupt and skip reach the replica running the job through a small named actor
  (`CancelBoard`) that the replica polls while it runs: Serve cannot address one replica.
- A replica that dies mid-job (killed, out of memory) makes the lane retry the job once (Serve
  starts another replica), then fail it with a clear message; a dead replica raises in the
  stream, so the front never waits on it.
- A job for a checkpoint goes to a replica that already holds it: the lane names the checkpoint as
  Serve's multiplexed model id, and each replica reports what it loaded (`serve.multiplexed`).
- Nothing about a job lives only in a replica: the request and its result go through the lane.

Ray is an optional extra (`pip install 'sd-webui[ray]'`); nothing imports it unless --ray is given.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import queue
import socket
import threading
import uuid
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from webui.config import Config
from webui.models.errors import ModelError
from webui.pipeline.progress import CancelToken, Progress, ProgressFn
from webui.workers import Worker

if TYPE_CHECKING:
    from webui.outputs import OutputWriter
    from webui.pipeline.request import GenerationRequest
    from webui.pipeline.state import GenerationResult

log = logging.getLogger(__name__)

APP_NAME = "sd-webui"
DEPLOYMENT = "sd-webui-worker"
BOARD = "sd-webui-cancel-board"
POLL_S = 0.25  # how often a replica asks the board whether its job was interrupted or skipped
MISSING = ("--ray needs Ray Serve, an optional extra: pip install 'sd-webui[ray]' "
           "(or: pip install 'ray[serve]')")


class RayUnavailable(ValueError):  # a flag asking for what is not installed: one line, exit 2
    pass


def import_ray() -> Any:
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError as err:
        raise RayUnavailable(f"{MISSING} ({err})") from None
    return ray


# --- the replica side --------------------------------------------------------------------------

class CancelBoard:
    """Interrupts and skips asked for jobs, by job id (a named Ray actor; see `board`)."""

    def __init__(self) -> None:
        self._interrupted: set[str] = set()
        self._skips: dict[str, int] = {}

    def interrupt(self, job_id: str) -> None:
        self._interrupted.add(job_id)

    def skip(self, job_id: str) -> None:
        self._skips[job_id] = self._skips.get(job_id, 0) + 1

    def state(self, job_id: str) -> tuple[bool, int]:
        return job_id in self._interrupted, self._skips.get(job_id, 0)

    def forget(self, job_id: str) -> None:
        self._interrupted.discard(job_id)
        self._skips.pop(job_id, None)


def replica_config(config: Config) -> Config:
    """The front's settings for a replica: one worker on the device Ray gave it, no Ray of its own."""
    return config.model_copy(update={"ray": None, "workers": None, "device_ids": (), "all_gpus": False,
                                     "api": False, "nowebui": False})


class GenerationReplica:
    """One Serve replica: an engine with one worker, running one request at a time."""

    def __init__(self, config: Config, board: Any) -> None:
        from webui.app import build_engine

        self.engine = build_engine(config)
        self.board = board
        self.name = f"ray:{socket.gethostname()}:{os.getpid()}"
        self.engine.warm_up().join()
        log.info("replica %s ready: %s", self.name, self.engine.describe_runtime())

    async def generate(self, request: GenerationRequest, preview_every: int, job_id: str):
        """Yields ("replica", name), ("progress", Progress)..., then ("result", GenerationResult)
        or ("error", message, bad_input); or, before starting, ("missing", message) when this
        replica lacks a model file the request names (the front then tries another replica)."""
        from ray import serve  # optional dependency (a replica runs only where Ray is)

        from webui.errors import classify

        yield ("replica", self.name)
        if (missing := await asyncio.to_thread(self._missing, request)) is not None:
            yield ("missing", missing)
            return
        if model_id := serve.get_multiplexed_model_id():
            await self.hold(model_id)
        events: queue.Queue = queue.Queue()
        token = CancelToken()

        def run() -> None:
            try:
                events.put(("result", self.engine.run(request, events.put, token, preview_every)))
            except Exception as err:  # noqa: BLE001  reported to the front, which fails the job
                failure = classify(err)
                if failure.log_traceback:
                    log.error("job %s: %s", job_id, failure.message, exc_info=err)
                events.put(("error", failure.message, failure.bad_input))

        threading.Thread(target=run, name=f"job-{job_id[:8]}", daemon=True).start()
        seen_skips = 0
        while True:
            try:
                item = await asyncio.to_thread(events.get, True, POLL_S)
            except queue.Empty:
                item = None
            if isinstance(item, Progress):
                yield ("progress", item)
            elif item is not None:
                yield item
                return
            interrupted, skips = await self.board.state.remote(job_id)
            if interrupted and not token.interrupted:
                token.interrupt()
            if skips > seen_skips:
                seen_skips = skips
                token.skip()

    async def hold(self, model_id: str) -> str:
        """Load the job's model here. The deployment's class wraps this in `serve.multiplexed`
        (see `replica_class`), so Serve knows which replica holds which model and sends the next
        job for it there."""
        await asyncio.to_thread(self.engine.bundle, model_id)
        return model_id

    def _missing(self, request: GenerationRequest) -> str | None:
        """Why this replica cannot find the request's checkpoints (None: it can). The list is read
        again once first: a file put in the shared folder after the replica started is found."""
        wanted = [("checkpoint", request.checkpoint)]
        if request.refiner_checkpoint:
            wanted.append(("refiner_checkpoint", request.refiner_checkpoint))
        for refreshed in (False, True):
            try:
                for field, query in wanted:
                    info = self.engine.resolve_checkpoint(query)
                    if not info.path.is_file():
                        raise ModelError(f"{field}: {info.path} is not on {self.name}")
                return None
            except (ModelError, OSError) as err:  # OSError: listed, but gone when read
                if refreshed:
                    return f"{self.name}: {err}"
                self.engine.registry.refresh(compute_hashes=False)
        return None

    def ping(self) -> str:
        """Answers at once: what a round trip through Serve costs (bench/workers.py)."""
        return self.name


def replica_class(serve: Any, models_per_replica: int) -> type:
    """The replica class the deployment runs: `hold` wrapped in `serve.multiplexed` (a decorator
    of Ray's, so it is applied here, where Ray is imported, not where the class is written)."""

    class Replica(GenerationReplica):
        @serve.multiplexed(max_num_models_per_replica=models_per_replica)
        async def hold(self, model_id: str) -> str:
            return await GenerationReplica.hold(self, model_id)

    return Replica


# --- the front side ----------------------------------------------------------------------------

class ReplicaLost(RuntimeError):
    pass


class ReplicaLacksModel(RuntimeError):
    pass


class RayCluster:
    """The connection to Ray and the deployed application: made once by the front process."""

    def __init__(self, config: Config) -> None:
        ray = import_ray()
        from ray import serve  # optional dependency (import_ray checked it)

        address = None if config.ray in (None, "auto") else config.ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                     configure_logging=False)
        self.ray = ray
        self.board = ray.remote(CancelBoard).options(name=BOARD, get_if_exists=True, lifetime=None,
                                                    num_cpus=0).remote()
        gpus = ray.cluster_resources().get("GPU", 0)
        options = {"num_gpus": 1} if gpus and not config.use_cpu else {"num_cpus": 1}
        low, high = config.ray_min_replicas, max(config.ray_min_replicas, config.ray_max_replicas)
        self.max_replicas = high
        serve.start(proxy_location="Disabled")
        replica = replica_class(serve, max(1, config.model_cache_size or 1))
        deployment = serve.deployment(replica, name=DEPLOYMENT, max_ongoing_requests=1,
                                      ray_actor_options=options, health_check_period_s=2,
                                      autoscaling_config={"min_replicas": low, "max_replicas": high,
                                                          "initial_replicas": low,
                                                          "target_ongoing_requests": 1,
                                                          "upscale_delay_s": 1, "downscale_delay_s": 60})
        log.info("Ray Serve: %d-%d replicas, each with %s; connecting to %s", low, high, options, address or "auto")
        self.handle = serve.run(deployment.bind(replica_config(config), self.board), name=APP_NAME,
                                route_prefix=None).options(stream=True)
        self.lost_errors = _lost_errors(ray)
        atexit.register(self.shutdown)  # a Serve app outlives its driver on a shared cluster: free its GPUs

    def shutdown(self) -> None:
        from ray import serve  # optional dependency (a RayCluster exists only where Ray is)

        try:
            if self.ray.is_initialized():
                serve.delete(APP_NAME)
        except Exception as err:  # noqa: BLE001  at exit, the cluster may already be gone
            log.debug("Ray Serve: %s", err)


def _lost_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """What a stream raises when the replica behind it dies or becomes unreachable."""
    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
             "ObjectLostError", "OwnerDiedError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


class RemoteRunner:
    """What a lane gives the engine in place of a local runner: `generate` runs on a replica;
    `writer` is the front's (a folder batch writes its outputs where the front's user said)."""

    def __init__(self, lane: RayLane, writer: OutputWriter) -> None:
        self.lane = lane
        self.writer = writer

    def generate(self, request: GenerationRequest, progress: ProgressFn | None = None,
                 cancel: CancelToken | None = None, preview_every: int = 0) -> GenerationResult:
        cancel = cancel or CancelToken()
        cluster = self.lane.cluster
        lost, lacking = 0, []
        while True:
            try:
                return self._once(cluster, request, progress, cancel, preview_every)
            except ReplicaLost as err:
                lost += 1
                if lost == 2 or cancel.interrupted:
                    raise RuntimeError(f"the Ray replica running this job was lost ({err}), and so was the one "
                                       f"that retried it") from None
                log.warning("%s: %s; retrying the job once on another replica", self.lane.name, err)
            except ReplicaLacksModel as err:
                # Serve cannot be told which replica to use: ask again, until each replica was
                # likely asked (twice as many tries as there may be replicas)
                lacking.append(str(err))
                if len(lacking) >= 2 * cluster.max_replicas or cancel.interrupted:
                    raise RuntimeError(f"no Ray replica has the model files this job names "
                                       f"(tried {len(lacking)} times): {lacking[-1]}") from None

    def _once(self, cluster: RayCluster, request: GenerationRequest, progress: ProgressFn | None,
              cancel: CancelToken, preview_every: int) -> GenerationResult:
        job_id = uuid.uuid4().hex
        self.lane.replica = None
        handle = cluster.handle  # a checkpoint's jobs go to a replica that holds it (Serve's model multiplexing)
        if request.checkpoint:
            handle = handle.options(multiplexed_model_id=request.checkpoint)
        stream = handle.generate.remote(request, preview_every, job_id)
        done = threading.Event()
        forwarder = threading.Thread(target=_forward_cancel, args=(cluster, job_id, cancel, done), daemon=True)
        forwarder.start()
        try:
            for item in stream:
                kind = item[0]
                if kind == "replica":
                    self.lane.replica = item[1]
                elif kind == "progress" and progress is not None:
                    progress(item[1])
                elif kind == "result":
                    return item[1]
                elif kind == "missing":
                    raise ReplicaLacksModel(item[1])
                elif kind == "error":
                    _, message, bad_input = item
                    raise (ValueError if bad_input else RuntimeError)(message)
            raise ReplicaLost("the replica's stream ended without a result")
        except cluster.lost_errors as err:
            raise ReplicaLost(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
        except cluster.ray.exceptions.RayTaskError as err:  # raised in the replica outside the job's own run
            cause = getattr(err, "cause", None) or err
            if isinstance(cause, (ValueError, ModelError)):
                raise cause from None
            raise RuntimeError(f"on {self.lane.name}: {type(cause).__name__}: {cause}") from None
        finally:
            done.set()
            cluster.board.forget.remote(job_id)


def _forward_cancel(cluster: RayCluster, job_id: str, cancel: CancelToken, done: threading.Event) -> None:
    """The front's Interrupt / Skip for this job, sent to the board the replica polls."""
    sent_interrupt = False
    while not done.wait(POLL_S / 2):
        if cancel.interrupted and not sent_interrupt:
            cluster.board.interrupt.remote(job_id)
            sent_interrupt = True
        if cancel.skipped:
            cancel.clear_skip()
            cluster.board.skip.remote(job_id)


class RayLane(Worker):
    """One of the queue's workers in Ray mode: its jobs run on whichever replica Serve picks.
    Work that is not a generation (Extras, interrogation) runs in the front process as a local
    worker's would."""

    remote = True

    def __init__(self, index: int, config: Config, cluster: RayCluster, writer: OutputWriter) -> None:
        super().__init__(index, 0, config.model_copy(update={"workers": None}))
        self.cluster = cluster
        self.replica: str | None = None  # the replica running (or that ran) this lane's job
        self._remote_runner = RemoteRunner(self, writer)

    @property
    def name(self) -> str:
        return self.replica or f"ray lane {self.index}"

    @property
    def runner(self) -> RemoteRunner:  # type: ignore[override]
        return self._remote_runner

    def holds(self, affinity: Hashable) -> bool:
        return False  # Serve routes; the lane holds no model

    def loaded(self) -> list[Hashable]:
        return []


def make_lanes(config: Config, writer: OutputWriter) -> list[Worker]:
    """As many lanes as replicas may be: Serve queues what the replicas cannot take yet, which is
    what its autoscaler scales on."""
    cluster = RayCluster(config)
    return [RayLane(i, config, cluster, writer) for i in range(cluster.max_replicas)]
