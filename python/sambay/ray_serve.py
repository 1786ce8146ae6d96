"""``sambay serve --ray``: replicas of the batched engine on a Ray cluster behind one
OpenAI-compatible ingress (Ray Serve). Needs the extra: ``pip install "sambay[ray]"``.

The pieces:

- :class:`SambayReplica` (a Serve deployment, N replicas): each loads the model and runs
  ``sambay serve``'s slot pool (:func:`sambay.server.load_pool`: one context, ``parallel``
  sequences decoded together). It runs the app's work, saves and loads conversation states.
- :class:`SambayIngress` (one replica): the very FastAPI app of ``sambay serve``
  (:func:`sambay.server.app.create_app`) over a :class:`RayBackend` instead of a local pool, so
  endpoints, streaming, errors, API key and limits are the same code.
- :class:`ConversationRouter`: Ray Serve's request-router hook (``RequestRouter``, Ray >= 2.46).
  A request pinned to a replica (the one holding its conversation's state) goes there first;
  any other request goes to the least-loaded replica (the lowest queue length Serve knows).
- The conversation table lives in the ingress (:class:`RayBackend`): conversation key ->
  the replica that ran its last turn. :meth:`RayBackend.move` moves a conversation's state to
  another replica through Ray's object store (``save_state`` on one replica, the result's
  object ref passed to ``load_state`` on the other), so its next turn is not prefilled again.
  Two events move states without being asked: a replica that Serve stops (scale-down, redeploy)
  hands its idle conversations to the others from its ``__del__`` (the hook Serve awaits during
  a graceful shutdown, after the replica's requests have drained), and a replica with no idle
  slot left that must overwrite a held conversation's state for another request saves that
  state first and hands it to a less loaded replica (:meth:`SambayReplica.run`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from typing import Any, Callable, Optional, Sequence

import ray
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError
from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .server import ServerSettings, app_options, load_pool
from .server.backend import ReplicaLost
from .server.pool import _END, _ERROR, _ITEM, _STARTED, GenerationCancelled, Job, QueueFull, ShuttingDown

__all__ = ["ConversationRouter", "RayBackend", "SambayIngress", "SambayReplica", "build_app",
           "replica_stats", "APP_NAME"]

log = logging.getLogger("sambay.ray")

APP_NAME = "sambay"          # the Serve application's name (``serve.run(..., name=APP_NAME)``)
MAX_CONVERSATIONS = 4096     # conversation keys remembered by the ingress and by each replica


# ---------------------------------------------------------------------------------------------
# routing


class ConversationRouter(RequestRouter):
    """Ray Serve request router: honours the ``replica`` (prefer) and ``avoid`` keywords of a
    call, then takes the least-loaded of the others.

    Ranks returned to Serve: ``[[preferred], [the others]]``. Serve tries a rank's replicas
    by queue length (cached or probed) and takes the lowest one below its
    ``max_ongoing_requests``, so a full preferred replica falls through to the others.
    """

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        want, avoid = kwargs.get("replica"), kwargs.get("avoid")
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all ranks tried: back off, don't spin
        preferred = [r for r in candidate_replicas if r.replica_id.unique_id == want]
        others = [r for r in candidate_replicas if r.replica_id.unique_id not in (want, avoid)]
        if not preferred and not others:  # only the avoided one is left: better than nothing
            others = list(candidate_replicas)
        return [preferred, others] if preferred else [others]


# ---------------------------------------------------------------------------------------------
# the replicas


def _portable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling (it crosses to the ingress as a value), else a
    RuntimeError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(err).__name__}: {err}")


class SambayReplica:
    """One replica: ``sambay serve``'s slot pool over the model (see :func:`build_app`).

    Every method takes the router's keywords ``replica`` and ``avoid`` (and ignores them).
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.pool = load_pool(settings)
        context = serve.get_replica_context()
        self.id = context.replica_id.unique_id
        self.app = context.app_name  # the application this replica belongs to (its ingress)
        # conversation key -> index of the slot that holds its state (least recently used first)
        self.held: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._handoffs: set[asyncio.Task[Any]] = set()  # hand-overs started by run(), not finished
        self._ingress: Any = None
        log.info("replica %s: %d slot(s)", self.id, self.pool.n_slots)

    def _hold(self, conversation: str, slot: int) -> None:
        self._forget_slot(slot)
        self.held[conversation] = slot
        while len(self.held) > MAX_CONVERSATIONS:
            self.held.popitem(last=False)

    def _forget_slot(self, slot: int) -> list[str]:
        """Forgets the conversation whose state ``slot`` holds (its state is about to change);
        returns its key, if any, in a list."""
        keys = [k for k, s in self.held.items() if s == slot]
        for key in keys:
            del self.held[key]
        return keys

    async def _hand_over(self, states: list[tuple[str, Any]]) -> None:
        """Gives ``(conversation, object ref of its state)`` pairs to the ingress, which loads
        them into other replicas (:meth:`RayBackend.adopt`); the states move replica to replica
        through the object store. Returns when they are placed (the refs must live till then)."""
        try:
            if self._ingress is None:
                self._ingress = serve.get_app_handle(self.app)
            n = await self._ingress.adopt.remote(self.id, states)
            log.info("replica %s: handed over %d of %d conversation(s)", self.id, n, len(states))
        except Exception as err:  # noqa: BLE001 - the states are lost: their next turn prefills
            log.warning("replica %s: could not hand over %d conversation(s): %s", self.id, len(states), err)

    async def _spill(self, conversation: str, llm: Any) -> None:
        """``conversation``'s state is in ``llm`` (a slot this request holds), about to be
        overwritten: saves it into the object store and hands it over in the background."""
        try:
            ref = await asyncio.to_thread(lambda: ray.put(llm.save_state()))
        except Exception as err:  # noqa: BLE001 - the conversation prefills again, as without this
            log.warning("replica %s: could not save %s to move it: %s", self.id, conversation, err)
            return
        task = asyncio.ensure_future(self._hand_over([(conversation, ref)]))
        self._handoffs.add(task)
        task.add_done_callback(self._handoffs.discard)

    async def describe(self, **_: Any) -> dict[str, Any]:
        """The replica's id and sizes."""
        return {"replica": self.id, "n_ctx": self.pool.llama.n_ctx(), "n_slots": self.pool.n_slots,
                "max_queue": self.pool.max_queue}

    async def stats(self, **_: Any) -> dict[str, Any]:
        """Counters: tokens evaluated, slots busy, requests waiting, conversations held."""
        return {"replica": self.id, "tokens_evaluated": self.pool.tokens_evaluated, "busy": self.pool.n_busy,
                "waiting": self.pool.n_waiting, "conversations": list(self.held)}

    async def run(self, work: Callable[[Any], Any], *, stream: bool, prompt_tokens: Optional[Sequence[int]] = None,
                  conversation: Optional[str] = None, spill: bool = False, **_: Any) -> Any:
        """Runs the app's ``work`` on a slot; yields ``(kind, value)`` messages (the protocol of
        :class:`sambay.server.pool.Job`): ``STARTED`` with this replica's id once the first token
        exists, then the items, then ``END``, or ``ERROR`` with the exception.

        With ``spill`` (other replicas exist): when the slot this request gets holds another
        conversation's state and no slot is left idle (the replica is full), that state is
        saved and handed to a less loaded replica before this request overwrites it."""
        job = None
        try:
            try:
                llm = await self.pool.acquire(None, prompt_tokens)
            except (QueueFull, ShuttingDown) as err:
                yield (_ERROR, err)
                return
            slot = self.pool.llamas.index(llm)
            evicted = [k for k in self._forget_slot(slot) if k != conversation]
            if evicted and spill and self.pool.n_busy == self.pool.n_slots:
                await self._spill(evicted[0], llm)
            job = self.pool.start(llm, work, stream=stream)
            try:
                await job.started()
                yield (_STARTED, self.id)
                async for item in job:
                    yield (_ITEM, item)
            except Exception as err:  # the app reports it (status by type)
                yield (_ERROR, _portable(err))
                return
            if conversation is not None:
                self._hold(conversation, slot)
            yield (_END, None)
        finally:
            if job is not None:
                job.cancel()  # the ingress went away mid-stream: stop generating (no-op when done)

    async def export_state(self, conversation: str, **_: Any) -> Any:
        """The saved state (a :class:`sambay.llama.LlamaState`) of ``conversation`` if this
        replica holds it on an idle slot, else None. The replica forgets the conversation."""
        slot = self.held.pop(conversation, None)
        if slot is None or not self.pool.take(self.pool.llamas[slot]):
            return None
        return await self.pool.start(self.pool.llamas[slot], lambda llm: llm.save_state(), stream=False).result()

    async def import_state(self, state: Any, *, conversation: str, **_: Any) -> dict[str, Any]:
        """Loads ``state`` (from :meth:`export_state`, possibly of another replica, or an object
        ref of one) into an idle slot: one that holds no conversation, else the one whose
        conversation was used least recently. Its next turn continues from there.

        Raises:
            ValueError: ``state`` is None.
            QueueFull: no slot is idle.
        """
        if isinstance(state, ray.ObjectRef):
            state = await state
        if state is None:
            raise ValueError(f"no state to import for {conversation!r}")
        recency = {s: i for i, s in enumerate(self.held.values())}
        order = sorted(range(self.pool.n_slots), key=lambda i: (i in recency, recency.get(i, 0)))
        for slot in order:
            if self.pool.take(self.pool.llamas[slot]):
                break
        else:
            raise QueueFull(f"replica {self.id}: no idle slot to load a state into")
        self._forget_slot(slot)
        await self.pool.start(self.pool.llamas[slot], lambda llm: llm.load_state(state), stream=False).result()
        self._hold(conversation, slot)
        return {"replica": self.id, "tokens": state.n_tokens}

    async def __del__(self) -> None:
        """Serve is stopping this replica (scale-down, redeploy; Serve awaits this after the
        replica's requests have drained, within ``graceful_shutdown_timeout_s``): hands the
        idle conversations' states to the other replicas through the ingress."""
        states = []
        for key in list(self.held):
            try:
                state = await self.export_state(key)
                if state is not None:
                    states.append((key, ray.put(state)))
            except Exception as err:  # noqa: BLE001 - that conversation prefills again
                log.warning("replica %s: could not save %s: %s", self.id, key, err)
        if states:
            await self._hand_over(states)
        if self._handoffs:  # run()'s hand-overs: their refs live in this process
            await asyncio.gather(*self._handoffs, return_exceptions=True)
        self.pool.close()


# ---------------------------------------------------------------------------------------------
# the ingress side


class _RemoteStop:
    """A :class:`~sambay.server.pool.Job`'s stop request for work on a replica: cancels the call."""

    def __init__(self) -> None:
        self.response: Any = None
        self._set = False

    def set(self) -> None:
        self._set = True
        if self.response is not None:
            self.response.cancel()

    def is_set(self) -> bool:
        return self._set


class RayBackend:
    """The :class:`~sambay.server.backend.Backend` of the ingress: work goes to the replicas.

    Args:
        replicas: the handle of the :class:`SambayReplica` deployment.
        settings: the server settings (the model file, limits).
        n_replicas: replicas deployed (the most, when autoscaling): for ``/health``'s counts,
            and whether a full replica may hand a conversation to another (see
            :meth:`SambayReplica.run`).
    """

    def __init__(self, replicas: Any, settings: ServerSettings, n_replicas: int) -> None:
        from .server.pool import SlotLlama

        self.handle = replicas
        self.settings = settings
        self.max_queue = settings.max_queue
        self.n_replicas = n_replicas
        self._inflight = 0
        self.shutting_down = False
        self.owners: collections.OrderedDict[str, str] = collections.OrderedDict()  # conversation -> replica
        self.moves: list[dict[str, Any]] = []  # the last handoffs, for the bench and the tests
        # tokenizer, template and limits for the app (its context is never evaluated)
        self._llama = SlotLlama(settings.model, n_ctx=settings.n_ctx, n_threads=1, n_threads_batch=1,
                                device="cpu", verbose=False, chat_template=settings.chat_template)

    @property
    def llama(self) -> Any:
        return self._llama

    @property
    def n_slots(self) -> int:
        return self.n_replicas * self.settings.parallel

    @property
    def n_busy(self) -> int:
        return min(self._inflight, self.n_slots)

    @property
    def n_waiting(self) -> int:
        return self._inflight - self.n_busy

    def _own(self, conversation: Optional[str], replica: str) -> None:
        if conversation is None:
            return
        self.owners[conversation] = replica
        self.owners.move_to_end(conversation)
        while len(self.owners) > MAX_CONVERSATIONS:
            self.owners.popitem(last=False)

    async def submit(self, work: Callable[[Any], Any], *, stream: bool, gone: Optional[asyncio.Event] = None,
                     prompt_tokens: Optional[Sequence[int]] = None, conversation: Optional[str] = None) -> Job:
        """Sends ``work`` to the replica holding ``conversation`` (or the least-loaded one);
        returns at once: errors (503 when every replica is full) come through the job."""
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down")
        if gone is not None and gone.is_set():
            raise GenerationCancelled()
        stop = _RemoteStop()
        job = Job(stop)  # type: ignore[arg-type]
        self._inflight += 1
        task = asyncio.ensure_future(self._feed(job, stop, work, stream, prompt_tokens, conversation))
        task.add_done_callback(lambda _: self._done())
        return job

    def _done(self) -> None:
        self._inflight -= 1

    async def _feed(self, job: Job, stop: _RemoteStop, work: Any, stream: bool,
                    prompt_tokens: Optional[Sequence[int]], conversation: Optional[str]) -> None:
        """Moves the replica's messages into ``job``'s queue. A replica lost before it sent
        anything is avoided and the call sent once more."""
        put = job._q.put_nowait
        lost: Optional[str] = None
        for attempt in range(2):
            owner = self.owners.get(conversation) if conversation is not None else None
            started = False
            stop.response = self.handle.options(stream=True).run.remote(
                work, stream=stream, prompt_tokens=prompt_tokens, conversation=conversation,
                spill=self.n_replicas > 1, replica=owner if owner != lost else None, avoid=lost)
            if stop.is_set():
                stop.response.cancel()
            try:
                async for kind, value in stop.response:
                    if kind == _STARTED:
                        started = True
                        lost = value
                        self._own(conversation, value)
                    put((kind, value))
                    if kind in (_END, _ERROR):
                        return
                put((_ERROR, ReplicaLost("the replica ended the stream unfinished")))
                return
            except BackPressureError:
                put((_ERROR, QueueFull("every replica is busy and the ingress queue is full; retry later")))
                return
            except (RayActorError, ReplicaUnavailableError, ray.exceptions.TaskCancelledError, asyncio.CancelledError) as err:
                if stop.is_set():  # the client went away
                    put((_END, None))
                    return
                if started or attempt == 1:
                    log.warning("replica %s lost: %s", lost, type(err).__name__)
                    put((_ERROR, ReplicaLost(f"the replica running this request stopped ({type(err).__name__})")))
                    return
                lost = owner  # nothing was sent: try another replica
            except Exception as err:  # noqa: BLE001
                put((_ERROR, err))
                return

    async def move(self, conversation: str, to: Optional[str] = None) -> dict[str, Any]:
        """Moves ``conversation``'s state from the replica holding it to ``to`` (a replica id;
        default: the least-loaded other replica) through Ray's object store.

        Returns:
            ``{"from", "to", "tokens", "seconds"}``.

        Raises:
            ValueError: no replica holds that conversation on an idle slot.
        """
        owner = self.owners.get(conversation)
        if owner is None:
            raise ValueError(f"no replica is known to hold conversation {conversation!r}")
        t0 = time.perf_counter()
        saved = self.handle.export_state.remote(conversation, replica=owner)  # stays in the object store
        done = await self.handle.import_state.remote(saved, conversation=conversation, replica=to,
                                                     avoid=owner if to is None else None)
        self._own(conversation, done["replica"])
        move = {"from": owner, "to": done["replica"], "tokens": done["tokens"], "seconds": time.perf_counter() - t0}
        self.moves = [*self.moves[-99:], move]
        return move

    async def adopt(self, source: str, states: list[tuple[str, Any]]) -> int:
        """Loads states handed over by replica ``source`` (stopping, or full) into the others:
        ``(conversation, state or object ref of one)`` pairs; a ref goes to the replica that
        loads it without passing through here. Returns how many found a place."""
        n = 0
        for conversation, state in states:
            try:
                done = await self.handle.import_state.remote(state, conversation=conversation, avoid=source)
            except Exception as err:  # noqa: BLE001
                log.warning("conversation %s not adopted: %s", conversation, err)
                continue
            self._own(conversation, done["replica"])
            n += 1
        return n

    def shutdown(self) -> None:
        self.shutting_down = True

    def close(self) -> None:
        self.shutting_down = True


class SambayIngress:
    """The HTTP ingress: :func:`sambay.server.app.create_app` over a :class:`RayBackend`."""

    def __init__(self, replicas: Any, settings: ServerSettings, n_replicas: int) -> None:
        self.settings = settings
        self.backend = RayBackend(replicas, settings, n_replicas)

    async def __serve_build_asgi_app__(self) -> Any:
        from .server.app import create_app

        return create_app(self.backend, **app_options(self.settings))

    async def move(self, conversation: str, to: Optional[str] = None) -> dict[str, Any]:
        """:meth:`RayBackend.move` (call through ``serve.get_app_handle(APP_NAME)``)."""
        return await self.backend.move(conversation, to)

    async def adopt(self, source: str, states: list[tuple[str, Any]]) -> int:
        """:meth:`RayBackend.adopt`."""
        return await self.backend.adopt(source, states)

    async def owners(self) -> dict[str, str]:
        """Conversation key -> the replica holding its state."""
        return dict(self.backend.owners)


def _parse_autoscale(autoscale: str) -> tuple[int, int]:
    lo, sep, hi = autoscale.partition(":")
    try:
        pair = int(lo), int(hi)
    except ValueError:
        pair = (0, 0)
    if not sep or not 1 <= pair[0] <= pair[1]:
        raise ValueError(f"autoscale must be MIN:MAX with 1 <= MIN <= MAX, got {autoscale!r}")
    return pair


def build_app(model: str, *, replicas: int = 1, autoscale: Optional[str] = None, replica_cpus: float = 1,
              **settings: Any) -> Any:
    """The Ray Serve application of ``sambay serve --ray``: ``replicas`` replicas of the
    engine behind one OpenAI-compatible ingress. Run it with ``serve.run(app, name=APP_NAME,
    route_prefix="/")`` on a connected Ray (``ray.init``).

    Args:
        model: the GGUF file; every node must have it at this path (shared storage, or
            ``sambay pull`` on each node).
        replicas: how many engine replicas (ignored with ``autoscale``).
        autoscale: ``"MIN:MAX"``: Serve adds and removes replicas between MIN and MAX by
            ongoing requests (target: ``parallel`` per replica).
        replica_cpus: CPUs Ray reserves for each replica.
        **settings: :class:`sambay.server.ServerSettings` fields (``n_ctx``, ``parallel``,
            ``max_queue``, ``api_key``, ``n_threads``, ...), as ``sambay serve`` takes them.

    Raises:
        ValueError: a bad setting, replica count or autoscale range.
    """
    config = ServerSettings(model=os.path.abspath(model), **settings)
    if config.metrics:
        # /metrics reads one process's slot pool; Ray Serve exports its own metrics per replica
        raise ValueError("--metrics is not available with --ray (Ray Serve exports its own metrics)")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
    scaling: dict[str, Any] = {"num_replicas": replicas}
    most = replicas
    if autoscale is not None:
        lo, most = _parse_autoscale(autoscale)
        scaling = {"autoscaling_config": AutoscalingConfig(
            min_replicas=lo, max_replicas=most, target_ongoing_requests=config.parallel)}
    replica = serve.deployment(
        SambayReplica, name="SambayReplica",
        # a replica takes its slots plus its queue; Serve's router holds max_queue more, then 503
        max_ongoing_requests=config.parallel + config.max_queue, max_queued_requests=config.max_queue,
        ray_actor_options={"num_cpus": replica_cpus},
        # Ray's config model takes a class or an import path (mypy reads its pydantic field as a dict)
        request_router_config=RequestRouterConfig(request_router_class=ConversationRouter),  # type: ignore[arg-type]
        graceful_shutdown_timeout_s=30, **scaling)
    ingress = serve.deployment(serve.ingress()(SambayIngress), name="SambayIngress",
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=10_000)
    return ingress.bind(replica.bind(config), config, most)  # type: ignore[attr-defined]  # serve.ingress()'s stub drops Deployment


def replica_stats(app_name: str = APP_NAME) -> dict[str, dict[str, Any]]:
    """Each running replica's :meth:`SambayReplica.stats`, by replica id (from a driver
    connected to the cluster)."""
    handle = serve.get_deployment_handle("SambayReplica", app_name)
    out = {}
    for name in ray.util.list_named_actors(all_namespaces=True):
        actor = name["name"] if isinstance(name, dict) else name
        if actor.startswith(f"SERVE_REPLICA::{app_name}#SambayReplica#"):
            stats = handle.stats.remote(replica=actor.rsplit("#", 1)[1]).result()
            out[stats["replica"]] = stats  # by who answered: a stopping replica's call goes elsewhere
    return out


def serve_on_ray(settings: ServerSettings, *, replicas: int = 1, autoscale: Optional[str] = None,
                 address: Optional[str] = None) -> int:
    """``sambay serve --ray``: joins the Ray cluster at ``address`` (default: ``$RAY_ADDRESS``,
    else a new local one), deploys :func:`build_app` with the ingress at ``settings.host``:
    ``settings.port``, and serves until interrupted.

    Raises:
        ValueError: a bad replica count or autoscale range.
        sambay.LoadError: the model file is missing or invalid here.
    """
    import dataclasses
    import sys

    from .engine import LoadError
    from .gguf_metadata import check_model_file
    from .server import require_dependencies

    require_dependencies()
    check_model_file(settings.model, LoadError)
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
              if f.name not in ("model", "host", "port", "log_level")}
    app = build_app(settings.model, replicas=replicas, autoscale=autoscale, **fields)
    ray.init(address=address, logging_level=logging.getLevelName(settings.log_level.upper()))
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        scale = f"autoscaling {autoscale}" if autoscale else f"{replicas} replica(s)"
        print(f"sambay serve --ray: OpenAI API at http://{host}:{settings.port}/v1 ({scale} of "
              f"{settings.parallel} slot(s); {'API key required' if settings.api_key else 'no API key'})",
              file=sys.stderr, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        serve.delete(APP_NAME)
    finally:
        ray.shutdown()
    return 0
