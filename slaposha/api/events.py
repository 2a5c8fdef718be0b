"""``GET /events``: the agent's status as server-sent events, one each time
it changes (clocks aside), and a comment on an idle stream now and then.

One thread reads the status every :data:`POLL_INTERVAL` for every client
of an API, and only while one listens.
"""

import json
import select
import socket
import ssl
import threading
import time

__all__ = ['StatusFeed', 'POLL_INTERVAL', 'KEEPALIVE']

POLL_INTERVAL = 0.5        # the event stream reads the status this often
KEEPALIVE = 15.0           # a comment on an idle event stream this often

_VOLATILE = frozenset(['time', 'time_left'])


def _stable(value):
    """The status without what changes at every call (clocks)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items()
                if k not in _VOLATILE}
    if isinstance(value, (list, tuple)):
        return [_stable(v) for v in value]
    return value


class StatusFeed(object):
    """The cluster status of ``agent`` as it changes, for the streams of
    one API; ``logger`` is the API's."""

    def __init__(self, agent, logger):
        self.agent = agent
        self.logger = logger
        self.subscribers = 0
        self._closing = threading.Event()
        self._wake = threading.Event()
        self._cond = threading.Condition()
        self._status = None
        self._status_key = None
        self._thread = None

    def start(self, name):
        self._closing.clear()
        self._thread = threading.Thread(target=self._poll, name=name,
                                        daemon=True)
        self._thread.start()

    def stop(self):
        self._closing.set()
        self._wake.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _poll(self):
        while not self._closing.is_set():
            with self._cond:
                listening = self.subscribers > 0
            if listening:
                try:
                    status = self.agent.cluster_status()
                    key = json.dumps(_stable(status), sort_keys=True,
                                     default=str)
                except Exception:
                    self.logger.exception('api: cannot read the cluster'
                                          ' status')
                else:
                    with self._cond:
                        if key != self._status_key:
                            self._status, self._status_key = status, key
                            self._cond.notify_all()
            else:
                with self._cond:
                    self._status = self._status_key = None
            self._wake.wait(POLL_INTERVAL)
            self._wake.clear()

    def stream(self, conn, write):
        """Write server-sent events to ``write``: the status now, then each
        time it changes; until the client of ``conn`` leaves or the API
        stops."""
        with self._cond:
            self.subscribers += 1
        self._wake.set()
        try:
            sent_key = None
            number = 0
            last_write = time.monotonic()
            while not self._closing.is_set():
                with self._cond:
                    if self._status_key in (None, sent_key):
                        self._cond.wait(POLL_INTERVAL)
                    status, key = self._status, self._status_key
                if key is not None and key != sent_key:
                    number += 1
                    write(('id: %d\nevent: status\ndata: %s\n\n' % (
                        number, json.dumps(status, default=str))).encode())
                    sent_key = key
                    last_write = time.monotonic()
                elif time.monotonic() - last_write >= KEEPALIVE:
                    write(b': keepalive\n\n')
                    last_write = time.monotonic()
                if _client_left(conn):
                    return
        finally:
            with self._cond:
                self.subscribers -= 1


def _client_left(conn):
    """True when the client closed its end (it sends nothing on a stream)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        if not readable:
            return False
        timeout = conn.gettimeout()
        conn.settimeout(0.05)
        try:
            return conn.recv(4096) == b''
        finally:
            conn.settimeout(timeout)
    except ssl.SSLWantReadError:
        return False
    except socket.timeout:
        return False
    except OSError:
        return True
