"""Following one cluster from the portal: its agents' event stream, their
own views, its takeover history, and what the portal's certificate may do
there.

A :class:`ClusterFeed` runs two threads:

- the stream: ``GET /events`` of the first agent that answers, in the order
  of ``endpoints``; each event is the cluster's whole status. A stream that
  ends, fails or stays silent for ``stream_timeout`` is given up for the
  next agent; when none answers, they are tried again after
  ``retry_interval``.
- the poll, every ``poll_interval``: ``GET /local`` of every agent at once,
  each within ``request_timeout``: which agents answer, and each host's own
  view (the age of its standby copies). When none answers, the cluster is
  unreachable at once (a stream cut off by the network stays silent until
  ``stream_timeout``); when the agent whose stream is followed does not
  answer but another does, the status is read from that one meanwhile. The
  history is read again when an owner changes, ``GET /whoami`` once.

Nothing is written anywhere: the portal shows what the clusters said last,
and when.
"""

import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from slaposha.api.client import (
    ApiClient, ApiError, ApiRefused, ApiUnreachable)
from slaposha.inputs import one_line

__all__ = ['ClusterFeed', 'ACTING_ROLES', 'certificate_may_act']

logger = logging.getLogger(__name__)

# The roles whose certificates may act on services (slaposha.api.https).
ACTING_ROLES = ('operator', 'admin', 'root')


def certificate_may_act(whoami, cert_role):
    """Whether the portal's certificate may act on a cluster: as the
    cluster says (its ``/whoami`` answer), else as the file's role says."""
    if whoami is not None:
        return 'act' in (whoami.get('may') or ())
    return cert_role in ACTING_ROLES



class ClusterFeed(object):
    """One cluster of the portal file (``conf``: a [cluster <name>]
    section), with the portal's timings (``settings``: its [portal]
    section). ``on_change()`` is called after each news."""

    def __init__(self, conf, settings, on_change=lambda: None):
        self.name = conf.name
        self.site = conf.site
        self.endpoints = list(conf.endpoints)
        self.files = (conf.cert, conf.key, conf.ca)
        self.cert_role = getattr(conf, 'role', None)
        self.settings = settings
        self._on_change = on_change
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = []
        self._pool = None
        # What the cluster said, and when (time.time()).
        self.status = None
        self.status_at = None
        self.status_via = None
        self.streaming = None       # the agent whose stream delivers
        self.stream_error = None
        self.answers = {}           # url: {'at', 'host', 'local'|'error'}
        self.unreachable = None     # why, when no agent answers
        self.history = None
        self.history_error = None
        self._history_key = None
        self.whoami = None

    # -- life cycle -----------------------------------------------------------

    def start(self):
        self._stop.clear()
        self._pool = ThreadPoolExecutor(
            max_workers=len(self.endpoints),
            thread_name_prefix='portal-%s' % self.name)
        for target, what in ((self._stream_loop, 'stream'),
                             (self._poll_loop, 'poll')):
            thread = threading.Thread(target=target, daemon=True,
                                      name='portal-%s-%s' % (self.name, what))
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self):
        self._stop.set()
        # The stream thread may sit in a read until stream_timeout: it is a
        # daemon and ends at its next line; the poll ends within a request.
        for thread in self._threads:
            thread.join(0.1 if thread.name.endswith('stream')
                        else self.settings.request_timeout + 1)
        self._threads = []
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def _client(self, url, timeout):
        cert, key, ca = self.files
        return ApiClient(url, cert=cert, key=key, ca=ca, timeout=timeout)

    def _changed(self):
        try:
            self._on_change()
        except Exception:
            logger.exception('portal: %s: cannot tell the change', self.name)

    # -- the stream -----------------------------------------------------------

    def _stream_loop(self):
        while not self._stop.is_set():
            for url in self.endpoints:
                if self._stop.is_set():
                    return
                self._follow(url)
            self._stop.wait(self.settings.retry_interval)

    def _follow(self, url):
        """Read the events of ``url`` until the stream ends or fails."""
        try:
            with self._client(url, self.settings.request_timeout) as client:
                for event, data in client.events(
                        timeout=self.settings.stream_timeout):
                    if self._stop.is_set():
                        return
                    if event == 'status' and isinstance(data, dict):
                        self._got_status(data, url, streamed=True)
                        if data.get('etcd') != 'ok' and \
                                len(self.endpoints) > 1:
                            # Cut off from etcd's majority, maybe alone:
                            # another agent may see the whole cluster.
                            error = 'its agent cannot read etcd'
                            break
                else:
                    error = 'the event stream ended'
        except ApiError as e:
            error = one_line(e)
        with self._lock:
            if self.streaming == url:
                self.streaming = None
            self.stream_error = error
        logger.info('portal: %s: event stream of %s: %s', self.name, url,
                    error)
        self._changed()

    def _got_status(self, status, url, streamed):
        with self._lock:
            self.status = status
            self.status_at = time.time()
            self.status_via = url
            self.unreachable = None
            if streamed:
                if self.streaming != url:
                    logger.info('portal: %s: following the events of %s',
                                self.name, url)
                self.streaming = url
                self.stream_error = None
        self._changed()

    # -- the poll -------------------------------------------------------------

    def _poll_loop(self):
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self.poll()
            except Exception:
                logger.exception('portal: %s: poll failed', self.name)
            self._stop.wait(max(0.0, self.settings.poll_interval -
                                (time.monotonic() - began)))

    def _ask(self, url, route, timeout=None):
        """(answer, None) or (None, one-line error)."""
        try:
            with self._client(url, timeout or
                              self.settings.request_timeout) as client:
                return client.request('GET', route), None
        except ApiError as e:
            return None, one_line(e)

    def ask_all(self, route, urls=None):
        """{url: (answer, error)} of ``GET route`` on each agent at once."""
        urls = list(urls or self.endpoints)
        futures = [(url, self._pool.submit(self._ask, url, route))
                   for url in urls]
        return {url: future.result() for url, future in futures}

    def poll(self):
        results = self.ask_all('/local')
        now = time.time()
        with self._lock:
            for url, (local, error) in results.items():
                if error is None:
                    self.answers[url] = {'at': now, 'local': local,
                                         'host': local.get('host')}
                else:
                    before = self.answers.get(url) or {}
                    self.answers[url] = {'at': now, 'error': error,
                                         'host': before.get('host')}
            answered = [u for u in self.endpoints if results[u][1] is None]
            if not answered:
                was = self.unreachable
                self.unreachable = 'no agent answers: %s' % '; '.join(
                    results[u][1] for u in self.endpoints)
                if was is None:
                    logger.warning('portal: %s: unreachable: %s',
                                   self.name, self.unreachable)
            else:
                self.unreachable = None
            stale = self.streaming not in answered
        if answered and stale:
            # No stream, or one that hangs on an agent gone silent.
            status, error = self._ask(answered[0], '/status')
            if error is None and isinstance(status, dict):
                self._got_status(status, answered[0], streamed=False)
        if answered and self.whoami is None:
            whoami, error = self._ask(answered[0], '/whoami')
            if error is None:
                with self._lock:
                    self.whoami = whoami
        if answered:
            self._read_history(answered[0])
        self._changed()

    def _read_history(self, url, again=False):
        with self._lock:
            services = (self.status or {}).get('services') or {}
            key = sorted((n, s.get('token')) for n, s in services.items()
                         if isinstance(s, dict))
            if key == self._history_key and not again:
                return
        answer, error = self._ask(url, '/history')
        with self._lock:
            if error is None:
                self.history = (answer or {}).get('history') or []
                self.history_error = None
                self._history_key = key
            else:
                self.history_error = error

    # -- what the portal asks -------------------------------------------------

    def snapshot(self):
        """What the cluster said, as plain values."""
        with self._lock:
            return {
                'name': self.name, 'site': self.site,
                'endpoints': list(self.endpoints),
                'status': self.status, 'status_at': self.status_at,
                'status_via': self.status_via, 'streaming': self.streaming,
                'stream_error': self.stream_error,
                'answers': dict(self.answers),
                'unreachable': self.unreachable,
                'history': self.history, 'history_error': self.history_error,
                'whoami': self.whoami, 'cert_role': self.cert_role,
            }


    def endpoint_of(self, host):
        """The API URL of ``host`` among the endpoints, or None: the agent
        that said it is ``host``, else the URL whose address is its."""
        with self._lock:
            for url in self.endpoints:
                if (self.answers.get(url) or {}).get('host') == host:
                    return url
            hosts = (self.status or {}).get('hosts') or {}
            address = (hosts.get(host) or {}).get('address')
        for url in self.endpoints:
            if urlsplit(url).hostname in (host, address):
                return url
        return None

    def _preferred(self):
        """The endpoints, those that answered last first."""
        with self._lock:
            return self._preferred_locked()

    def _preferred_locked(self):
        first = [self.streaming, self.status_via] + [
            u for u in self.endpoints
            if 'error' not in (self.answers.get(u) or {'error': 1})]
        order = []
        for url in first + self.endpoints:
            if url and url not in order:
                order.append(url)
        return order

    def act(self, service, verb, to=None, force=False, behalf=None,
            at=None):
        """(url, the agent's one-line message) of an action; raises
        ApiRefused when the agent refuses it, ApiUnreachable when none
        answers. A takeover goes to the agent of ``to`` (agents take a
        service over to themselves). ``behalf``: the portal's user, whom
        the cluster's history names after the portal's certificate;
        ``at``: a restore's time or snapshot."""
        body = {'force': True} if force else {}
        if at:
            body['at'] = at
        if behalf:
            body['for'] = re.sub(r'[^A-Za-z0-9_.@ -]', '-', behalf)[:64]
        if verb == 'takeover':
            url = self.endpoint_of(to)
            if url is None:
                raise ApiUnreachable('no endpoint of cluster %s is the API of'
                                     ' %s' % (self.name, to))
            urls = [url]
        else:
            if to:
                body['to'] = to
            urls = self._preferred()
        error = ApiUnreachable('no agent of cluster %s answered within'
                               ' action_timeout' % self.name)
        deadline = time.monotonic() + self.settings.action_timeout
        for url in urls:
            left = deadline - time.monotonic()
            if left < 0.1:
                break
            try:
                with self._client(url, left) as client:
                    try:
                        answer = client.request('POST', '/services/%s/%s'
                                                % (service, verb), body)
                    except ApiRefused as e:
                        # An agent older than 'for': the action without.
                        if 'for' not in body or 'unknown field' not in \
                                e.message:
                            raise
                        body.pop('for')
                        answer = client.request('POST', '/services/%s/%s'
                                                % (service, verb), body)
                return url, answer.get('message', '')
            except ApiUnreachable as e:
                error = e   # the intent is idempotent: the next agent
        raise error

    def history_now(self):
        """The history as the first agent that answers has it now (the
        cached one when none answers)."""
        with self._lock:
            urls = [] if self.unreachable else self._preferred_locked()
        for url in urls:
            self._read_history(url, again=True)
            with self._lock:
                if self.history_error is None:
                    break
        with self._lock:
            return self.history

    def decisions(self, service):
        """The decisions about ``service`` of every agent that answers,
        oldest first, and {url: error} of those that do not."""
        found, errors = [], {}
        for url, (answer, error) in self.ask_all('/decisions').items():
            if error is not None:
                errors[url] = error
                continue
            for d in (answer or {}).get('decisions') or []:
                if isinstance(d, dict) and d.get('service') == service:
                    found.append(dict(d, host=answer.get('host')))
        found.sort(key=lambda d: d.get('time') or 0)
        return found, errors
