"""Copies of the node's software releases to the standbys, driven by what
each standby reports it has.

A takeover never builds: every software release the owner completed must
be on each standby, at the same path (DESIGN.md 4 and 6). The owner does
not trust its memory of what it sent: a standby deletes a release, a disk
is replaced, a copy is cut. Each standby reports the completed releases it
has (``Slapos.report``, announced with its host's health), and the owner
copies what a report lacks (:class:`Copies` decides which, and when):

- a release the standby lacks is copied at once; while a copy sent is not
  yet in the standby's report, it is not sent again for ``confirm_within``
  seconds (the report follows within an agent cycle or two);
- a copy that failed is retried with backoff, ``retry_min`` doubling up to
  ``retry_max``; its error and age show in the owner's status;
- a release that was in a standby's report and is missing again (deleted
  there) is copied again at once.
"""

import threading
import time

from slaposha.units import human_seconds

__all__ = ['Copies']


class _Copy(object):
    """One release for one standby: sent, failed, or confirmed there."""

    def __init__(self):
        self.sent = None       # monotonic time of the last copy that ended
        self.tries = 0         # failed tries since the last success
        self.error = None
        self.failed_at = None  # monotonic time of the last failure
        self.next_try = 0.0


class Copies(object):
    """What the owner sends to each standby, from their reports. The
    copies run in a worker thread while the agent's loop reads the
    problems: one lock guards the state."""

    def __init__(self, retry_min, retry_max, confirm_within):
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.confirm_within = confirm_within
        self._copies = {}      # (peer, release): _Copy
        self._lock = threading.Lock()

    def due(self, have, reports, now=None):
        with self._lock:
            return self._due(have, reports, now)

    def _due(self, have, reports, now):
        """[(peer, release)] to copy now: the releases of ``have`` that the
        report of each peer (``{peer: set of releases}``; a peer without a
        report is left alone) lacks, unless just sent or waiting for a
        retry."""
        now = time.monotonic() if now is None else now
        for key in list(self._copies):
            peer, release = key
            if peer not in reports or release in reports[peer] or \
                    release not in have:
                del self._copies[key]  # confirmed, or nothing to do
        todo = []
        for peer in sorted(reports):
            for release in sorted(have):
                if release in reports[peer]:
                    continue
                copy = self._copies.get((peer, release))
                if copy is not None:
                    if copy.error is not None and now < copy.next_try:
                        continue
                    if copy.error is None and copy.sent is not None and \
                            now - copy.sent < self.confirm_within:
                        continue
                todo.append((peer, release))
        return todo

    def next_retry(self):
        """Monotonic time of the earliest retry waiting, or None."""
        with self._lock:
            times = [c.next_try for c in self._copies.values()
                     if c.error is not None]
        return min(times) if times else None

    def sent(self, peer, release, now=None):
        with self._lock:
            copy = self._copies.setdefault((peer, release), _Copy())
            copy.sent = time.monotonic() if now is None else now
            copy.tries, copy.error, copy.failed_at = 0, None, None

    def failed(self, peer, release, error, now=None):
        """Record a failed copy; returns the seconds until its retry."""
        now = time.monotonic() if now is None else now
        with self._lock:
            copy = self._copies.setdefault((peer, release), _Copy())
            copy.tries += 1
            copy.error = str(error)
            copy.failed_at = now
            wait = min(self.retry_max,
                       self.retry_min * 2 ** (copy.tries - 1))
            copy.next_try = now + wait
        return wait

    def problems(self, name, now=None):
        """One line per failing copy, naming the release with ``name``
        (release -> 'URL (folder)'), the standby, how many tries, how long
        ago the last failed and why."""
        now = time.monotonic() if now is None else now
        with self._lock:
            failing = sorted((peer, release, c.tries, c.failed_at, c.error,
                              c.next_try)
                             for (peer, release), c in self._copies.items()
                             if c.error is not None)
        return ['software release %s to %s: %d failed %s, the last %s ago:'
                ' %s; next try in %s' % (
                    name(release), peer, tries,
                    'try' if tries == 1 else 'tries',
                    human_seconds(now - failed_at), error,
                    human_seconds(max(0.0, next_try - now)))
                for peer, release, tries, failed_at, error, next_try
                in failing]
