"""etcd v3 over its JSON gateway: how slaposha talks to etcd, with deadlines.

Ownership of a service rests on an etcd lease (DESIGN.md, decisions 1 and 2),
so this layer owns what the lease protocol needs and libraries do not give
(reference/coordination.md, A.5):

- deadlines: every call has an overall deadline (``timeout``, seconds) and
  each HTTP request a short one (``request_timeout``), so that a keepalive
  never outlives the owner's self-fence deadline and nothing retries forever;
- endpoint rotation, as Patroni's etcd3 does: on a connection error or a
  timeout the next endpoint is tried at once, the one that answered last is
  tried first next time, and a round where every endpoint failed is followed
  by a pause of ``retry_interval``;
- definitive answers: an error answered by etcd is raised at once, except the
  transient ones (no leader, leader changed, request timed out, too many
  requests), which another member, or the same one a moment later, may not
  repeat.

A write whose answer was lost (timeout) is sent again to the next endpoint,
so it may be applied twice. Txns guarded on a create_revision are safe to
replay: the replay fails and its failure branch shows the first one's work
(for example the owner key carrying our own lease).

One Client may be shared by threads; a watch holds its own HTTP connection.
Gateway facts relied on (etcd 3.4 and later) are noted where they are used.
"""

import base64
import json
import logging
import os
import re
import socket
import threading
import time
from typing import Any, List, NamedTuple

import requests
import urllib3

__all__ = [
    'EtcdError', 'EtcdUnavailable', 'EtcdRequestError', 'LeaseNotFound',
    'WatchCanceled', 'KeyValue', 'Event', 'Lease', 'RangeResult',
    'TxnResult', 'Status', 'Member', 'Compare', 'Op', 'Client',
    'parse_version',
]

logger = logging.getLogger(__name__)


# -- errors -------------------------------------------------------------------

class EtcdError(Exception):
    """Anything this client raises, so that callers catch etcd trouble once.

    The text is one line naming the endpoint and the operation, fit for a log
    line or ``slaposha status`` as it is.
    """

    def __init__(self, message, endpoint=None, operation=None):
        self.message = message
        self.endpoint = endpoint
        self.operation = operation
        super().__init__(str(self))

    def __str__(self):
        where = ' '.join(part for part in ('etcd', self.endpoint, self.operation)
                         if part)
        return '%s: %s' % (where, self.message)


class EtcdUnavailable(EtcdError):
    """No endpoint answered before the call's deadline (timeouts end here too).

    The caller cannot know what etcd holds: an owner must treat its lease as
    running out, never as renewed. The text lists the endpoints tried and the
    last error, which is what an operator needs to find the broken link.
    """

    def __init__(self, operation, endpoints, last_error, timeout):
        self.endpoints = list(endpoints)
        self.last_error = last_error
        self.timeout = timeout
        message = 'no endpoint answered within %.2f s (tried %s); last error: %s' % (
            timeout, ', '.join(self.endpoints) or 'none, no time left',
            last_error or 'none')
        super().__init__(message, None, operation)


class EtcdRequestError(EtcdError):
    """etcd answered, and refused: asking again or elsewhere gives the same.

    ``code`` is the gRPC status code (3 invalid argument, 5 not found, 11 out
    of range...), None when the answer was not an etcd one (e.g. HTTP 404).
    """

    def __init__(self, message, code=None, http_status=None, endpoint=None,
                 operation=None):
        self.code = code
        self.http_status = http_status
        if code is not None:
            message = '%s (grpc code %s)' % (message, code)
        super().__init__(message, endpoint, operation)


class LeaseNotFound(EtcdRequestError):
    """The lease expired or was revoked: keys attached to it are gone.

    An owner that sees this has lost its service and must fence now; retrying
    cannot bring the lease back. ``lease_id`` is None when etcd did not say
    which lease (a txn putting with a dead lease).
    """

    def __init__(self, lease_id=None, endpoint=None, operation=None):
        self.lease_id = lease_id
        which = 'lease %x' % lease_id if lease_id is not None else 'lease'
        super().__init__('%s not found (expired or revoked)' % which,
                         5, None, endpoint, operation)


class WatchCanceled(EtcdError):
    """etcd ended a watch, in practice because its start revision was compacted.

    Changes were lost between the two, so the caller must read the keys again
    and watch from the revision of that read. ``compact_revision`` is the
    oldest revision still available (0 when etcd gave another reason).
    """

    def __init__(self, reason, compact_revision=0, endpoint=None):
        self.reason = reason
        self.compact_revision = compact_revision
        super().__init__(reason, endpoint, 'watch')


# -- what calls return --------------------------------------------------------

class KeyValue(NamedTuple):
    """A key as etcd stores it, with the revisions that make it a lock.

    The create_revision of an owner key is the owner's fencing token; lease
    tells which lease keeps the key alive (0: none).
    """
    key: str
    value: str
    create_revision: int
    mod_revision: int
    version: int
    lease: int


class Event(NamedTuple):
    """A change seen by a watch, so that waiters act on it without polling.

    ``type`` is 'PUT' or 'DELETE'; a DELETE carries the key and its
    mod_revision only (value '' and other numbers 0).
    """
    type: str
    key: str
    value: str
    create_revision: int
    mod_revision: int
    version: int
    lease: int


class Lease(NamedTuple):
    """A granted lease. ``ttl`` is what etcd granted, which can be more than
    was asked (it raises TTLs below 1.5 election timeouts): deadlines must be
    computed from it."""
    id: int
    ttl: int


class RangeResult(NamedTuple):
    """Keys with the revision they were read at, so that a watch can start at
    revision + 1 and miss no change in between."""
    kvs: List[KeyValue]
    count: int
    revision: int


class TxnResult(NamedTuple):
    """The outcome of a compare-and-swap.

    ``responses`` has one item per op of the branch that ran, shaped like the
    matching call's result: a list of KeyValue for a range (on a lost race:
    who holds the key), a revision for a put, a deleted count for a delete.
    ``revision`` is the store revision after the txn: the key's
    create_revision when a create succeeded.
    """
    succeeded: bool
    responses: List[Any]
    revision: int


class Status(NamedTuple):
    """One member's view of the cluster: its version says whether it has the
    lease-safety fixes (3.5.13 and later), leader says where writes go."""
    endpoint: str
    version: str
    member_id: int
    leader: int
    raft_term: int
    revision: int

    @property
    def is_leader(self):
        return self.member_id != 0 and self.member_id == self.leader


class Member(NamedTuple):
    """A member of the etcd cluster, to find client URLs and check membership
    against the cluster file. ``name`` is '' until the member has started."""
    id: int
    name: str
    peer_urls: List[str]
    client_urls: List[str]
    is_learner: bool


def parse_version(text):
    """'3.4.23' -> (3, 4, 23), so that versions compare as numbers.

    Accepts a leading 'v' and ignores suffixes ('3.5.0-rc.1' -> (3, 5, 0)).
    """
    match = _VERSION_RE.match(text.strip())
    if not match:
        raise ValueError('not an etcd version: %r' % text)
    return tuple(int(part or 0) for part in match.groups())


# -- transactions ---------------------------------------------------------------

class Compare:
    """Guards of a txn. The fencing check of an owner is one of them:
    ``Compare.create_revision(owner_key, '==', token)``; taking a free key is
    ``Compare.create_revision(owner_key, '==', 0)``.

    Operators: '==', '!=', '<', '>'.
    """

    @staticmethod
    def create_revision(key, operator, revision):
        return _compare(key, operator, 'CREATE', 'create_revision', str(int(revision)))

    @staticmethod
    def mod_revision(key, operator, revision):
        return _compare(key, operator, 'MOD', 'mod_revision', str(int(revision)))

    @staticmethod
    def version(key, operator, version):
        return _compare(key, operator, 'VERSION', 'version', str(int(version)))

    @staticmethod
    def value(key, operator, value):
        return _compare(key, operator, 'VALUE', 'value', _b64(value))


class Op:
    """Operations of a txn branch, the same as the Client calls of that name."""

    @staticmethod
    def put(key, value, lease=None):
        request = {'key': _b64(key), 'value': _b64(value)}
        if lease:
            request['lease'] = str(int(lease))
        return {'request_put': request}

    @staticmethod
    def delete(key, prefix=False):
        return {'request_delete_range': _key_range(key, prefix)}

    @staticmethod
    def range(key, prefix=False):
        return {'request_range': _key_range(key, prefix)}


# -- the client -------------------------------------------------------------------

class Client:
    """An etcd v3 client over several endpoints, with a deadline on every call.

    ``endpoints``: client URLs such as 'http://10.0.0.1:2379', tried in this
    order at first. ``request_timeout``: time allowed to one HTTP request.
    ``retry_interval``: pause after a round where every endpoint failed.
    ``session``: a requests.Session to use (the client makes its own
    otherwise). ``tls``: (ca_file, cert_file, key_file), or an object with
    those attributes, for https endpoints. ``timeout``: overall deadline of a
    call that gives none.

    ``last_change`` is the store revision of the newest change this client
    made (a put, a delete that deleted, a txn whose branch wrote): a reader
    of a watched cache waits for it, so that it never decides on a view
    older than its own writes.
    """

    def __init__(self, endpoints, request_timeout=0.5, retry_interval=0.2,
                 session=None, tls=None, timeout=2.0):
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        self.endpoints = [_check_endpoint(url) for url in endpoints]
        if not self.endpoints:
            raise ValueError('etcd client needs at least one endpoint')
        self.request_timeout = float(request_timeout)
        self.retry_interval = float(retry_interval)
        self.timeout = float(timeout)
        self._own_session = session is None
        if session is None:
            session = requests.Session()
            # etcd is never reached through the environment's HTTP proxy, and
            # reading proxy variables and ~/.netrc on every request would eat
            # into the lease budget.
            session.trust_env = False
        self._session = session
        self._tls = _tls_options(tls)
        self._lock = threading.Lock()
        self._current = 0
        self.last_change = 0
        self._streams = set()      # responses of the watches in progress
        self._closed = False

    def _changed(self, revision):
        with self._lock:
            self.last_change = max(self.last_change, revision)

    def __repr__(self):
        return 'Client(%r)' % (self.endpoints,)

    @property
    def endpoint(self):
        """The endpoint tried first: the last one that answered."""
        with self._lock:
            return self.endpoints[self._current]

    def prefer_first(self):
        """Try the endpoints in their given order again: the first one (an
        agent's own member) is tried first even after another answered."""
        with self._lock:
            self._current = 0

    def close(self):
        """Close pooled connections (only those of a session made here), and
        end the watches in progress: their generators end, and no new watch
        starts. An etcd member stops at once only when no watch is open on
        it (3.5 waits for its streams), so an agent closes its own first."""
        with self._lock:
            self._closed = True
            streams = list(self._streams)
        for response in streams:
            sock = _stream_socket(response)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read
                except OSError:
                    pass
        if self._own_session:
            self._session.close()

    # -- keys

    def get(self, key, timeout=None):
        """The KeyValue of ``key``, or None when it does not exist."""
        kvs = self.range(key, timeout=timeout).kvs
        return kvs[0] if kvs else None

    def range(self, key, range_end=None, prefix=False, revision=None, limit=0,
              serializable=False, timeout=None):
        """Keys from ``key`` to ``range_end`` (excluded), or under ``key``
        with ``prefix=True``, sorted by key, as a RangeResult.

        Reads are linearizable unless ``serializable=True`` (which may answer
        stale data from a partitioned member: never for ownership decisions).
        """
        if prefix and range_end is not None:
            raise ValueError('range of %r: give range_end or prefix=True, not both'
                             % (key,))
        payload = _key_range(key, prefix)
        if range_end is not None:
            payload['range_end'] = _b64(range_end)
        if revision:
            payload['revision'] = str(int(revision))
        if limit:
            payload['limit'] = str(int(limit))
        if serializable:
            payload['serializable'] = True
        _, body = self._request('kv/range', payload, timeout)
        return _range_result(body)

    def get_prefix(self, prefix, timeout=None):
        """Every KeyValue whose key starts with ``prefix``, sorted by key."""
        return self.range(prefix, prefix=True, timeout=timeout).kvs

    def put(self, key, value, lease=None, timeout=None):
        """Store ``value`` (str or bytes) at ``key``; returns the store revision
        of the write. With ``lease``, the key goes when the lease does
        (LeaseNotFound if it is already gone)."""
        request = Op.put(key, value, lease)['request_put']
        _, body = self._lease_request('kv/put', request, timeout, lease)
        revision = _int(body.get('header', {}), 'revision')
        self._changed(revision)
        return revision

    def delete(self, key, prefix=False, timeout=None):
        """Delete ``key`` (or every key under it with ``prefix=True``);
        returns how many keys were deleted."""
        _, body = self._request('kv/deleterange', _key_range(key, prefix), timeout)
        deleted = _int(body, 'deleted')
        if deleted:
            self._changed(_int(body.get('header', {}), 'revision'))
        return deleted

    def revision(self, timeout=None):
        """The current store revision (linearizable)."""
        # Counting the keys at "\0" reads nothing but still returns the
        # header of a linearizable read.
        _, body = self._request('kv/range', {'key': _b64('\0'), 'count_only': True},
                                timeout)
        return _int(body.get('header', {}), 'revision')

    def txn(self, compare, success=(), failure=(), timeout=None):
        """If every Compare holds, run the ``success`` ops, else the
        ``failure`` ones, atomically; returns a TxnResult."""
        payload = {'compare': list(compare), 'success': list(success),
                   'failure': list(failure)}
        _, body = self._request('kv/txn', payload, timeout)
        revision = _int(body.get('header', {}), 'revision')
        if any('response_put' in item or _int(item.get('response_delete_range', {}),
                                              'deleted')
               for item in body.get('responses', [])):
            self._changed(revision)
        # proto3 JSON leaves out false booleans: no "succeeded" means false.
        return TxnResult(bool(body.get('succeeded', False)),
                         [_txn_response(item) for item in body.get('responses', [])],
                         revision)

    # -- leases

    def grant(self, ttl, timeout=None):
        """A new lease of ``ttl`` whole seconds; the Lease says what etcd
        actually granted."""
        endpoint, body = self._request('lease/grant', {'TTL': int(ttl)}, timeout)
        if body.get('error'):  # a field of LeaseGrantResponse, unused by 3.4
            raise EtcdRequestError(body['error'], None, 200, endpoint, 'lease/grant')
        return Lease(_int(body, 'ID'), _int(body, 'TTL'))

    def keepalive(self, lease_id, timeout=None):
        """Renew the lease for its full TTL; returns that TTL in seconds.

        The renewal counts from when etcd received the request, which is after
        the caller sent it: deadlines computed from the send time are safe.
        Raises LeaseNotFound when the lease is gone.
        """
        endpoint, body = self._request('lease/keepalive', {'ID': str(int(lease_id))},
                                       timeout)
        return _renewed_ttl(body, lease_id, endpoint)

    def keepalive_at(self, lease_id, endpoint, timeout):
        """Renew the lease through ``endpoint`` alone, on a connection of
        its own that is closed after, within ``timeout``; returns the TTL.

        For an owner whose renewals fail: a pooled connection, or one whose
        first packets were lost while the link was down, may wait for TCP's
        next retransmission (up to seconds) after the link is back; a new
        one goes through as soon as the network does. The endpoint that
        answers is tried first next time. Raises LeaseNotFound when the
        lease is gone, EtcdUnavailable when no answer came.
        """
        session = requests.Session()
        session.trust_env = False
        try:
            body = self._post(endpoint, 'lease/keepalive',
                              {'ID': str(int(lease_id))}, timeout, session)
        except _Transient as exc:
            raise EtcdUnavailable('lease/keepalive', [endpoint],
                                  '%s: %s' % (endpoint, exc), timeout) from None
        finally:
            session.close()
        ttl = _renewed_ttl(body, lease_id, endpoint)
        self._remember(endpoint)  # the next renewals go there first
        return ttl

    def revoke(self, lease_id, timeout=None):
        """End the lease now and delete its keys: a clean hand-over lets a
        waiter take the service in one round trip instead of a TTL.

        Raises LeaseNotFound when the lease is already gone (which, after a
        lost answer, can also mean that this very call revoked it).
        """
        self._lease_request('lease/revoke', {'ID': str(int(lease_id))}, timeout,
                            lease_id)

    def lease_ttl(self, lease_id, timeout=None):
        """Seconds the lease has left, without renewing it (status display,
        tests). Raises LeaseNotFound when the lease is gone."""
        endpoint, body = self._lease_request(
            'lease/timetolive', {'ID': str(int(lease_id))}, timeout, lease_id)
        ttl = _int(body, 'TTL')
        if ttl < 0:
            raise LeaseNotFound(int(lease_id), endpoint, 'lease/timetolive')
        return ttl

    def _lease_request(self, operation, payload, timeout, lease_id):
        # etcd's "lease not found" does not say which lease: name it here.
        try:
            return self._request(operation, payload, timeout)
        except LeaseNotFound as exc:
            if lease_id and exc.lease_id is None:
                raise LeaseNotFound(int(lease_id), exc.endpoint, operation) from None
            raise

    # -- watch

    def watch(self, key, start_revision=None, timeout=None, prefix=False,
              range_end=None, batches=False, patience=None):
        """Yield the Events of ``key`` (or of keys under it with
        ``prefix=True``, or from it to ``range_end`` excluded) from
        ``start_revision`` (default: changes after now), until ``timeout``
        seconds have passed; then the generator ends, so that a caller can
        loop and look at its own state in between. With ``batches=True`` it
        yields lists of Events as etcd sent them: every event of one
        revision (one txn, or the keys of a lease that ended) in the same
        list, so that a cache applying a list never shows half a change.

        If the connection breaks, the watch goes on from the next endpoint at
        the revision after the last event, so no event is lost or repeated.
        An endpoint must confirm the watch within ``request_timeout`` and
        have a raft leader (a member cut off from the others would send
        nothing: etcd ends such a watch after about three election
        timeouts); an idle connection is probed by TCP keepalives, so that a
        member lost with its link is left within seconds.
        Raises EtcdUnavailable if, when time is up (or, with ``patience``,
        once no endpoint has been watching for that many seconds), no
        endpoint is watching, and WatchCanceled if etcd drops the watch
        (revision compacted). Closing the generator closes its HTTP
        connection, which ends the watch in etcd.
        """
        budget = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + budget
        create_request = _key_range(key, prefix)
        if range_end is not None:
            if prefix:
                raise ValueError('watch of %r: give range_end or prefix=True,'
                                 ' not both' % (key,))
            create_request['range_end'] = _b64(range_end)
        next_revision = int(start_revision) if start_revision else None
        watching = False
        lost_since = time.monotonic()  # no endpoint watching since then
        tried, last_error = [], None
        while deadline - time.monotonic() > 0 and not self._closed:
            endpoint = self.endpoint
            if endpoint not in tried:
                tried.append(endpoint)
            request = dict(create_request)
            if next_revision:
                request['start_revision'] = str(next_revision)
            response = None
            try:
                confirm = min(deadline, time.monotonic() + self.request_timeout)
                response = self._open_stream(endpoint, 'watch',
                                             {'create_request': request},
                                             deadline, confirm,
                                             _WATCH_HEADERS)
                with self._lock:
                    self._streams.add(response)
                for message in _stream_messages(response, deadline,
                                                None if watching else confirm):
                    if message.get('error'):
                        _raise_error(message['error'], endpoint, 'watch', 200)
                    result = message.get('result', {})
                    if result.get('created'):
                        watching = True
                        self._remember(endpoint)
                        if next_revision is None:
                            # Without a start revision etcd watches from the
                            # revision after the one in this header.
                            next_revision = _int(result.get('header', {}), 'revision') + 1
                    if result.get('canceled'):
                        oldest = _int(result, 'compact_revision')
                        raise WatchCanceled(
                            result.get('cancel_reason') or 'revision %s is compacted,'
                            ' the oldest one left is %s' % (next_revision, oldest),
                            oldest, endpoint)
                    events = [_event(raw) for raw in result.get('events', ())]
                    if not events:
                        continue
                    # Resume after the last event seen, not after the
                    # header's revision: etcd may send a batch's header
                    # with a revision whose events come in a later batch.
                    next_revision = events[-1].mod_revision + 1
                    if batches:
                        yield events
                    else:
                        for event in events:
                            yield event
                break  # time is up while watching
            except _Transient as exc:
                if self._closed:
                    return
                if watching:
                    lost_since = time.monotonic()
                watching = False
                last_error = '%s: %s' % (endpoint, exc)
                logger.debug('etcd %s watch failed (%s), trying the next endpoint',
                             endpoint, exc)
                self._advance(endpoint)
                now = time.monotonic()
                if deadline - now <= self.retry_interval or (
                        patience is not None and now - lost_since >= patience):
                    break
                time.sleep(self.retry_interval)
            finally:
                if response is not None:
                    with self._lock:
                        self._streams.discard(response)
                    response.close()
        if not watching and not self._closed:
            raise EtcdUnavailable('watch', tried or self.endpoints, last_error,
                                  budget if patience is None else patience)

    # -- cluster

    def status(self, endpoint=None, timeout=None):
        """The Status of ``endpoint`` (one of the endpoints, or any URL), or of
        the first endpoint that answers."""
        only = _check_endpoint(endpoint) if endpoint else None
        answered, body = self._request('maintenance/status', {}, timeout, only)
        header = body.get('header', {})
        return Status(answered, body.get('version', ''), _int(header, 'member_id'),
                      _int(body, 'leader'), _int(body, 'raftTerm'),
                      _int(header, 'revision'))

    def move_leader(self, target_id, endpoint, timeout=None):
        """Hand raft leadership to member ``target_id``; ``endpoint`` must be
        the current leader's (etcd refuses the request elsewhere)."""
        self._request('maintenance/transfer-leadership',
                      {'targetID': str(int(target_id))}, timeout,
                      _check_endpoint(endpoint))

    def members(self, timeout=None):
        """The Members of the cluster, as etcd knows them."""
        _, body = self._request('cluster/member/list', {}, timeout)
        return [Member(_int(member, 'ID'), member.get('name', ''),
                       list(member.get('peerURLs', [])),
                       list(member.get('clientURLs', [])),
                       bool(member.get('isLearner', False)))
                for member in body.get('members', [])]

    # -- requests, endpoint rotation, deadlines

    def _request(self, operation, payload, timeout=None, only=None):
        """POST to /v3/<operation> until an endpoint answers or time is up;
        returns (endpoint that answered, decoded body)."""
        budget = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + budget
        tried, last_error = [], None
        while True:
            for endpoint in ([only] if only else self._rotation()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if endpoint not in tried:
                    tried.append(endpoint)
                try:
                    body = self._post(endpoint, operation, payload,
                                      min(self.request_timeout, remaining))
                except _Transient as exc:
                    last_error = '%s: %s' % (endpoint, exc)
                    logger.debug('etcd %s %s failed (%s), trying the next endpoint',
                                 endpoint, operation, exc)
                    if not only:
                        self._advance(endpoint)
                    continue
                if not only:
                    self._remember(endpoint)
                return endpoint, body
            # A pause only after a whole round failed: the next endpoint is
            # worth trying at once, the same ones again only a bit later.
            if deadline - time.monotonic() <= self.retry_interval:
                raise EtcdUnavailable(operation, tried, last_error, budget)
            time.sleep(self.retry_interval)

    def _post(self, endpoint, operation, payload, request_timeout,
              session=None):
        try:
            # A total timeout (urllib3.Timeout), not requests' separate
            # connect and read timeouts that could add up to twice as much.
            response = (session or self._session).post(
                '%s/v3/%s' % (endpoint, operation), data=json.dumps(payload),
                headers=_JSON_HEADERS, timeout=urllib3.Timeout(total=request_timeout),
                **self._tls)
        except requests.RequestException as exc:
            raise _Transient(_describe(exc, request_timeout)) from None
        try:
            return _decode_answer(response, endpoint, operation)
        finally:
            response.close()

    def _open_stream(self, endpoint, operation, payload, deadline,
                     first_answer, headers=None):
        """POST a streamed request; its answer must begin by ``first_answer``
        (a monotonic time), and the stream may last until ``deadline``."""
        now = time.monotonic()
        connect_timeout = min(self.request_timeout, max(deadline - now, 0.001))
        try:
            response = self._session.post(
                '%s/v3/%s' % (endpoint, operation), data=json.dumps(payload),
                headers=headers or _JSON_HEADERS, stream=True,
                timeout=urllib3.Timeout(connect=connect_timeout,
                                        read=max(first_answer - now, 0.001)),
                **self._tls)
        except requests.RequestException as exc:
            raise _Transient(_describe(exc, connect_timeout)) from None
        if response.status_code != 200:
            try:
                _decode_answer(response, endpoint, operation)
            finally:
                response.close()
        _keep_alive(_stream_socket(response))
        return response

    def _rotation(self):
        with self._lock:
            current = self._current
        return self.endpoints[current:] + self.endpoints[:current]

    def _advance(self, failed):
        # Only move on if no other thread already did: two threads seeing the
        # same endpoint fail must not skip the next one.
        with self._lock:
            if self.endpoints[self._current] == failed:
                self._current = (self._current + 1) % len(self.endpoints)

    def _remember(self, good):
        with self._lock:
            if good in self.endpoints:
                self._current = self.endpoints.index(good)


# -- gateway details ------------------------------------------------------------------

_JSON_HEADERS = {'Content-Type': 'application/json'}
# gRPC metadata through the gateway: etcd refuses the watch on a member
# without a raft leader and ends it when the member loses its leader for
# about three election timeouts (clientv3's WithRequireLeader), instead of
# leaving the watcher with a member that will never send another event.
_WATCH_HEADERS = dict(_JSON_HEADERS, **{'Grpc-Metadata-hasleader': 'true'})

# TCP keepalive of a watch's connection: first probe after 1 s idle, then
# every 1 s, dead after 2 unanswered. A member whose host was lost with its
# link sends no reset: without the probes an idle watch would wait for it
# until its deadline.
_KEEPALIVE = (1, 1, 2)

_VERSION_RE = re.compile(r'^v?(\d+)\.(\d+)(?:\.(\d+))?')

_COMPARE_RESULTS = {'==': 'EQUAL', '!=': 'NOT_EQUAL', '<': 'LESS', '>': 'GREATER'}

_LEASE_NOT_FOUND = 'requested lease not found'

# gRPC UNAVAILABLE is what etcd answers while it cannot serve now: no leader,
# leader changed, request timed out, server stopped, unhealthy cluster.
_TRANSIENT_CODES = (14,)
# Others worth another try: a rate limit (whereas "database space exceeded"
# shares its code 8 and is definitive), and a renewal that reached a member
# that lost leadership (etcd issue 21671, 3.5.13 and later).
_TRANSIENT_MESSAGES = ('etcdserver: too many requests', 'etcdserver: not leader',
                       'not a primary lessor')


class _Transient(Exception):
    """A failure worth trying again elsewhere; never leaves this module."""


def _check_endpoint(url):
    url = str(url).strip().rstrip('/')
    if not re.match(r'^https?://[^/]+$', url):
        raise ValueError('etcd endpoint %r: expected a URL such as'
                         ' http://10.0.0.1:2379' % url)
    return url


def _tls_options(tls):
    if tls is None:
        return {}
    if isinstance(tls, (tuple, list)):
        ca_file, cert_file, key_file = (list(tls) + [None, None, None])[:3]
    else:
        ca_file = getattr(tls, 'ca_file', None)
        cert_file = getattr(tls, 'cert_file', None)
        key_file = getattr(tls, 'key_file', None)
    options = {}
    if ca_file:
        options['verify'] = ca_file
    if cert_file:
        options['cert'] = (cert_file, key_file) if key_file else cert_file
    return options


def _b64(text):
    if isinstance(text, str):
        text = text.encode('utf-8')
    return base64.b64encode(text).decode('ascii')


def _unb64(text):
    # slaposha writes UTF-8 text only; a foreign binary value must not make a
    # whole prefix unreadable, hence "replace".
    return base64.b64decode(text or '').decode('utf-8', 'replace')


def _prefix_end(prefix):
    """The range_end that selects every key starting with ``prefix``."""
    end = bytearray(prefix.encode('utf-8') if isinstance(prefix, str) else prefix)
    while end:
        if end[-1] < 0xff:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b'\0'  # prefix of only 0xff bytes (or empty): every key after it


def _key_range(key, prefix=False):
    request = {'key': _b64(key)}
    if prefix:
        request['range_end'] = _b64(_prefix_end(key))
    return request


def _compare(key, operator, target, field, value):
    if operator not in _COMPARE_RESULTS:
        raise ValueError('compare operator %r: expected one of %s'
                         % (operator, ', '.join(_COMPARE_RESULTS)))
    return {'key': _b64(key), 'target': target,
            'result': _COMPARE_RESULTS[operator], field: value}


def _int(mapping, name):
    # int64 fields come as JSON strings, and are left out when zero.
    return int(mapping.get(name) or 0)


def _key_value(kv):
    return KeyValue(_unb64(kv.get('key')), _unb64(kv.get('value')),
                    _int(kv, 'create_revision'), _int(kv, 'mod_revision'),
                    _int(kv, 'version'), _int(kv, 'lease'))


def _event(raw):
    # PUT is the enum's zero value, so proto3 JSON leaves it out.
    kv = _key_value(raw.get('kv', {}))
    return Event(raw.get('type') or 'PUT', *kv)


def _range_result(body):
    return RangeResult([_key_value(kv) for kv in body.get('kvs', [])],
                       _int(body, 'count'), _int(body.get('header', {}), 'revision'))


def _txn_response(item):
    if 'response_range' in item:
        return _range_result(item['response_range']).kvs
    if 'response_put' in item:
        return _int(item['response_put'].get('header', {}), 'revision')
    if 'response_delete_range' in item:
        return _int(item['response_delete_range'], 'deleted')
    return item  # a nested txn: left as etcd wrote it


def _decode_answer(response, endpoint, operation):
    """The JSON body of a successful answer; raise on any other."""
    try:
        body = response.json()
    except ValueError:
        body = None
    status = response.status_code
    # Streamed calls (keepalive, watch) answer errors in-band, with HTTP 200
    # (or 503 when refused at once, etcd 3.5):
    # {"error": {"grpc_code" or "code": .., "message": ..}}.
    if isinstance(body, dict) and isinstance(body.get('error'), dict):
        _raise_error(body['error'], endpoint, operation, status)
    if status == 200 and isinstance(body, dict):
        return body
    # Unary calls answer errors as {"error": .., "message": .., "code": ..}
    # with an HTTP status mapped from the gRPC code (400, 404, 503...).
    if isinstance(body, dict) and ('code' in body or 'error' in body):
        _raise_error(body, endpoint, operation, status)
    if status == 200 or status >= 500:
        # A member dying in the middle of an answer, or a proxy in front of a
        # dead one: another endpoint may do better.
        raise _Transient('HTTP %d with a body that is not etcd JSON' % status)
    hint = ' (etcd older than 3.4 serves /v3beta, not /v3)' if status == 404 else ''
    raise EtcdRequestError('HTTP %d %s%s' % (status, response.reason or '', hint),
                           None, status, endpoint, operation)


def _raise_error(error, endpoint, operation, http_status):
    code = error.get('code', error.get('grpc_code'))
    message = str(error.get('message') or error.get('error') or error).strip()
    if code in _TRANSIENT_CODES or any(text in message for text in _TRANSIENT_MESSAGES):
        raise _Transient('%s (grpc code %s)' % (message, code))
    if code == 5 and _LEASE_NOT_FOUND in message:
        raise LeaseNotFound(None, endpoint, operation)
    raise EtcdRequestError(message, code, error.get('http_code', http_status),
                           endpoint, operation)


def _renewed_ttl(body, lease_id, endpoint):
    # A keepalive is a streaming RPC; one POST with one message gets one
    # {"result": {...}} back. A lease that is gone is no error: etcd
    # answers without "TTL" (TTL 0 left out by proto3 JSON).
    ttl = _int(body.get('result', body), 'TTL')
    if ttl <= 0:
        raise LeaseNotFound(int(lease_id), endpoint, 'lease/keepalive')
    return ttl


def _describe(exc, timeout):
    """One short line for a requests failure, instead of urllib3's paragraph."""
    if isinstance(exc, requests.ConnectTimeout):
        return 'no connection within %.2f s' % timeout
    if isinstance(exc, requests.ReadTimeout):
        return 'no answer within %.2f s' % timeout
    cause = _os_error(exc)
    if cause is not None:
        return os.strerror(cause.errno)
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def _os_error(exc):
    # urllib3 wraps the socket's OSError in two or three layers of exceptions.
    seen, pending = set(), [exc]
    while pending:
        item = pending.pop(0)
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, OSError) and item.errno:
            return item
        if isinstance(item, BaseException):
            pending.extend([item.__cause__, item.__context__,
                            getattr(item, 'reason', None)])
            pending.extend(arg for arg in item.args if isinstance(arg, BaseException))
    return None


def _stream_socket(response):
    # Private attributes of http.client (then urllib3): reaching the socket
    # lets each read wait only until the watch's deadline. Without it the
    # read timeout set when connecting still ends an idle watch, only later
    # after a burst of events.
    for path in (('_fp', 'fp', 'raw', '_sock'), ('_connection', 'sock')):
        obj = response.raw
        for attr in path:
            obj = getattr(obj, attr, None)
        if obj is not None and hasattr(obj, 'settimeout'):
            return obj
    return None


def _keep_alive(sock):
    if sock is None:
        return
    idle, interval, count = _KEEPALIVE
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    except (OSError, AttributeError):
        pass  # not Linux: the watch's deadline still ends it


def _stream_messages(response, deadline, first_answer=None):
    """The JSON messages of a streamed answer, one per line, until the
    deadline; raises _Transient if the stream ends or breaks before it, or
    if no message came by ``first_answer`` (before the deadline)."""
    sock = _stream_socket(response)
    chunks = response.iter_content(chunk_size=None)
    pending = b''
    while True:
        while b'\n' in pending:
            line, pending = pending.split(b'\n', 1)
            if not line.strip():
                continue
            try:
                message = json.loads(line.decode('utf-8'))
            except ValueError:
                raise _Transient('unreadable message %r' % line[:100]) from None
            first_answer = None
            yield message
        until = deadline if first_answer is None else min(first_answer, deadline)
        remaining = until - time.monotonic()
        if remaining <= 0:
            if until < deadline:
                raise _Transient('no answer within the request timeout')
            return
        if sock is not None:
            try:
                sock.settimeout(remaining)
            except OSError:
                pass  # already closed: the read below says so
        try:
            chunk = next(chunks)
        except StopIteration:
            raise _Transient('stream closed by etcd') from None
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            # Our own read timeout at the deadline is the normal end.
            if time.monotonic() >= deadline - 0.01:
                return
            if until < deadline and time.monotonic() >= until - 0.01:
                raise _Transient('no answer within the request timeout') from None
            raise _Transient('stream broken: %s' % _describe(exc, remaining)) from None
        pending += chunk
