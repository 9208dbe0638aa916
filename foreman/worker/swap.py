"""The swap: load the model a claim needs, give the load up if the policy says so, and log what it cost."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import suppress

import structlog

from foreman.metrics import Metrics
from foreman.queue.lifecycle import Lifecycle
from foreman.queue.page_feed import PageFeed
from foreman.routing.aliases import fold, waiting_for
from foreman.scheduling.driver import PolicyDriver
from foreman.scheduling.policy import Decision, Reason
from foreman.storage import Claim, Storage
from foreman.worker.residency import Residency
from foreman.worker.wakeups import WakeUps

log = structlog.get_logger("foreman.worker")


class Swap:
    """Loads claimed jobs' models in the policy's stead; counts the swaps."""

    def __init__(
        self,
        *,
        store: Storage,
        lifecycle: Lifecycle,
        residency: Residency,
        driver: PolicyDriver,
        wakeups: WakeUps,
        metrics: Metrics,
        feed: PageFeed,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
    ) -> None:
        self._store = store
        self._lifecycle = lifecycle
        self._residency = residency
        self._driver = driver
        self._wakeups = wakeups
        self._metrics = metrics
        self._feed = feed  # the queue's watchers (/events, the live page)
        self._clock = clock
        self._monotonic = monotonic
        self.swaps = 0
        # Models being loaded for a claimed job, with how many loads: for drain orders and
        # positions they are as good as resident, since their jobs run next.
        self.loading: dict[str, int] = {}

    async def __call__(self, claim: Claim) -> bool:
        """Load the claimed job's model (with the release keep_alive), and log why and what the swap cost.

        Returns False when the load was given up for an interactive job that
        arrived meanwhile (`Policy.abandons`); the job is back in the queue,
        in its place and without an attempt charged.
        """
        key = claim.job.model_key
        self.loading[key] = self.loading.get(key, 0) + 1
        try:
            return await self._swap(claim)
        finally:
            self.loading[key] -= 1
            if not self.loading[key]:
                del self.loading[key]

    async def _swap(self, claim: Claim) -> bool:
        job = claim.job
        decision = claim.decision
        key = job.model_key
        leaving = sorted(self._residency.models)
        waiting_now = await self.waiting_by_model()
        waiting_leaving = {k: waiting_now.get(k, 0) for k in leaving}
        await self._residency.make_room(keep=key, evict=decision.evict, waiting=waiting_now)
        expected = self._driver.book.costs().load_s.get(key)
        started = self._monotonic()
        load = self._residency.load(job, expected or 0.0)
        if not self._driver.policy.may_abandon(decision):
            await load
        elif await self._abandoned(asyncio.create_task(load), decision):
            await self._lifecycle.put_back(job, shutdown=False)
            self._driver.abandoned(decision)
            self._residency.recheck()
            log.info(
                "model.load_abandoned",
                model=key,
                reason=Reason.PRIORITY.value,
                after_s=round(self._monotonic() - started, 3),
                job_id=job.id,
            )
            self._wakeups.look_again()
            return False
        load_s = self._monotonic() - started
        self._driver.loaded(key, load_s, self._clock())
        await self._residency.loaded(job)  # and read /api/ps again before the next pick
        self._wakeups.look_again()  # with FOREMAN_PARALLEL > 1, more jobs for this model may start now
        self.swaps += 1
        self._metrics.swapped(load_s)
        self._feed.swap(
            model=key, reason=decision.reason.value, from_models=leaving, load_s=load_s, at=self._clock()
        )
        log.info(
            "model.swap",
            reason=decision.reason.value,
            priority=decision.priority.value,
            from_models=leaving,
            to_model=key,
            waiting_from=sum(waiting_leaving.values()),
            waiting_to=claim.waiting_after + 1,
            oldest_wait_s=round(decision.waited, 3),
            evict=decision.evict,
            load_s=round(load_s, 3),
            learned_load_s=None if expected is None else round(expected, 3),
        )
        return True

    async def waiting_by_model(self) -> dict[str, int]:
        """Queued jobs per model key, alias jobs counted with the model that would serve them now."""
        resident = self._residency.as_read()
        if resident is None:
            resident = self._driver.state.resident
        return waiting_for(await self._store.waiting_by_model(), resident)

    async def _abandoned(self, load: asyncio.Task[None], decision: Decision) -> bool:
        """Wait for `load`; True if it was cancelled because the policy gives it up.

        Cancelling the request makes Ollama abort the load, as it does for
        any client that leaves while its model loads.
        """
        try:
            while True:
                self._wakeups.arrived.clear()
                arrived = asyncio.ensure_future(self._wakeups.arrived.wait())
                try:
                    done, _ = await asyncio.wait({load, arrived}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    arrived.cancel()
                if load in done:
                    await load  # raises what the load raised
                    return False
                queues = fold(await self._store.queues(), self._driver.before.resident).queues
                if self._driver.abandons(decision, queues, self._clock()):
                    return True
        finally:
            if not load.done():
                load.cancel()
                with suppress(asyncio.CancelledError):
                    await load
