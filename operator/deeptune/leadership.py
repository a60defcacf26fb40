"""Leader election on a coordination.k8s.io/v1 Lease, so that of several replicas exactly one
reconciles (the others watch and keep warm caches, ready to take over).

The algorithm is client-go's (`tools/leaderelection`): take the Lease when it is free, ours, or its
holder has not renewed it for `duration` seconds as measured on *our* clock (no trust in the other
replica's); renew every `retry` seconds; stop leading when no renewal succeeded for `renew_deadline`
seconds (before another replica may take over); hand the Lease back on a clean shutdown, so a
rollout fails over at once. Every write is a replace with the resourceVersion read, so two
contenders cannot both win.

Not the Kubernetes client's `leaderelection` package: it runs in a thread that cannot be stopped,
ends for good on a connection error (the API server restarting), and never releases the Lease.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from deeptune.observability import LEADER

LOG = logging.getLogger(__name__)
REQUEST_TIMEOUT = (2.0, 5.0)


@dataclass(frozen=True)
class LeaseSettings:
    name: str
    namespace: str
    identity: str
    duration: float = 15.0
    renew_deadline: float = 10.0
    retry: float = 2.0


class Leadership:
    """Contends for the Lease and runs `lead` only while holding it."""

    def __init__(self, settings: LeaseSettings) -> None:
        self.settings = settings
        self._observed: tuple[str | None, object] | None = None
        self._observed_at = 0.0
        self._held = False
        self._closed = False
        """Set by the release at shutdown: a renewal still in flight then takes nothing back."""
        self._lock = threading.Lock()
        self.leading = False

    async def run(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Until cancelled: wait for the Lease, run `lead` while it is held, stop it when it is lost.
        Cancelled (a shutdown), it stops `lead` and the renewals first, then hands the Lease back."""
        try:
            while True:
                await self._acquire()
                LOG.info("leading: %s holds Lease %s/%s", *self._who())
                await self._lead_while_held(lead)
                LOG.warning("no longer leading (Lease %s/%s)", self.settings.namespace, self.settings.name)
        finally:
            await asyncio.shield(asyncio.to_thread(self._release))

    async def _lead_while_held(self, lead: Callable[[], Coroutine[Any, Any, None]]) -> None:
        LEADER.set(1)
        self.leading = True
        work = asyncio.create_task(lead(), name="leading")
        keep = asyncio.create_task(self._keep(), name="lease renewal")
        try:
            await asyncio.wait({work, keep}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, keep):
                task.cancel()
            await asyncio.gather(work, keep, return_exceptions=True)
            LEADER.set(0)
            self.leading = False
        if work.done() and not work.cancelled() and work.exception() is not None:
            LOG.error("the leader's work failed", exc_info=work.exception())

    def _who(self) -> tuple[str, str, str]:
        return self.settings.identity, self.settings.namespace, self.settings.name

    async def _acquire(self) -> None:
        while not await asyncio.to_thread(self._try):
            await asyncio.sleep(self.settings.retry)

    async def _keep(self) -> None:
        """Renew until a renewal has not succeeded for `renew_deadline` seconds."""
        renewed = time.monotonic()
        while time.monotonic() - renewed < self.settings.renew_deadline:
            await asyncio.sleep(self.settings.retry)
            if await asyncio.to_thread(self._try):
                renewed = time.monotonic()
        self._held = False

    def _try(self) -> bool:
        """One attempt to take or renew the Lease; False when another holds it or the API fails."""
        try:
            with self._lock:
                return not self._closed and self._take_or_renew()
        except ApiException as error:
            if error.status not in (404, 409):
                LOG.warning("Lease %s/%s: %s", self.settings.namespace, self.settings.name, error.reason)
            return False
        except (HTTPError, OSError) as error:
            LOG.warning("Lease %s/%s: %s", self.settings.namespace, self.settings.name, error)
            return False

    def _take_or_renew(self) -> bool:
        api, s = client.CoordinationV1Api(), self.settings
        now = dt.datetime.now(dt.UTC)
        try:
            lease = api.read_namespaced_lease(s.name, s.namespace, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as error:
            if error.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=s.name, namespace=s.namespace),
                spec=self._spec(now, acquired=now, transitions=0),
            )
            api.create_namespaced_lease(s.namespace, body, _request_timeout=REQUEST_TIMEOUT)
            self._held = True
            return True
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity or None
        record = (holder, spec.renew_time)
        if record != self._observed:
            self._observed, self._observed_at = record, time.monotonic()
        ours = holder == s.identity
        if holder is not None and not ours and time.monotonic() - self._observed_at < s.duration:
            return False
        transitions = (spec.lease_transitions or 0) + (0 if ours else 1)
        lease.spec = self._spec(now, acquired=spec.acquire_time if ours else now, transitions=transitions)
        api.replace_namespaced_lease(s.name, s.namespace, lease, _request_timeout=REQUEST_TIMEOUT)
        self._held = True
        return True

    def _spec(self, now: dt.datetime, acquired: dt.datetime | None, transitions: int) -> client.V1LeaseSpec:
        return client.V1LeaseSpec(
            holder_identity=self.settings.identity,
            lease_duration_seconds=int(self.settings.duration),
            acquire_time=acquired,
            renew_time=now,
            lease_transitions=transitions,
        )

    def _release(self) -> None:
        """Hand the Lease back (a clean shutdown): another replica takes over at its next try."""
        with self._lock:
            self._closed = True
            if self._held:
                self._hand_back()

    def _hand_back(self) -> None:
        api, s = client.CoordinationV1Api(), self.settings
        try:
            lease = api.read_namespaced_lease(s.name, s.namespace, _request_timeout=REQUEST_TIMEOUT)
            if lease.spec is None or lease.spec.holder_identity != s.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.lease_duration_seconds = 1
            api.replace_namespaced_lease(s.name, s.namespace, lease, _request_timeout=REQUEST_TIMEOUT)
            LOG.info("released Lease %s/%s", s.namespace, s.name)
        except (ApiException, HTTPError, OSError) as error:
            LOG.warning("could not release Lease %s/%s: %s", s.namespace, s.name, error)
        finally:
            self._held = False
