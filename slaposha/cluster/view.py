"""What each etcd member says of itself, for the operators' views (status
page, ``slaposha mon``): reachable or not, leader, version, raft term.

Asking every member takes up to a request timeout per member that is down,
so it is never done in the agent's loop or in a request: a thread refreshes
the list every ``interval`` while somebody has read it in the last minute,
and a read returns the last list at once::

    view = EtcdView(client, cluster.etcd_endpoints(), names, interval=2.0,
                    timeout=0.5)
    view.read()   # [{"name", "endpoint", "reachable", "leader", ...}]
"""

import threading
import time

from slaposha.cluster.etcd import EtcdError

__all__ = ['EtcdView']

IDLE_AFTER = 60.0   # seconds without a reader before the thread rests


class EtcdView(object):

    def __init__(self, client, endpoints, names, interval, timeout=0.5):
        self.client = client
        self.timeout = timeout
        self.endpoints = list(endpoints)
        self.names = list(names)
        self.interval = interval
        self._members = None
        self._last_read = 0.0
        self._lock = threading.Lock()
        self._thread = None
        self._stop = threading.Event()

    def read(self):
        """The members as last seen (None before the first refresh)."""
        with self._lock:
            self._last_read = time.monotonic()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run,
                                                name='etcd-view', daemon=True)
                self._thread.start()
            return self._members

    def stop(self):
        self._stop.set()

    def _run(self):
        while not self._stop.is_set():
            with self._lock:
                if time.monotonic() - self._last_read > IDLE_AFTER:
                    self._thread = None
                    return
            members = self.refresh()
            with self._lock:
                self._members = members
            self._stop.wait(self.interval)

    def refresh(self):
        members = []
        for name, endpoint in zip(self.names, self.endpoints):
            entry = {'name': name, 'endpoint': endpoint}
            try:
                status = self.client.status(endpoint, timeout=self.timeout)
            except EtcdError as e:
                # The last error alone: the endpoint is in the entry.
                text = ' '.join(str(e).split())
                entry.update(reachable=False,
                             error=text.rsplit('last error: ', 1)[-1][-120:])
            else:
                entry.update(reachable=True, leader=status.is_leader,
                             version=status.version,
                             raft_term=status.raft_term)
            members.append(entry)
        return members
