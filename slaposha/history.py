"""Takeovers and switches of each service, kept in etcd for the operators
(the status page, ``slaposha mon``, ``GET /history``).

The host that ends up running the service writes one record, guarded by its
fencing token (a deposed owner writes nothing), under
``<root>history/<service>/<token, 20 digits>``: beside the service keys,
not under them, so that the agents' reads of ``services/`` every cycle do
not grow with it. Only the newest ``[agent] history_kept`` of each service
are kept.

A record::

    {"service": "web", "kind": "takeover" | "switch", "from": "hA",
     "to": "hB", "token": 1234, "since": <time>, "running": <time>,
     "duration": 3.1, "by": "operator alice"}

A switch (or an operator's takeover) given up is kept too, by the owner
that gives it up (the host that runs the service instead, or the switch's
host when the service failed to start there), with ``"kind": "abandoned"``,
``"from"`` that host, ``"to"`` the host it was asked to move to,
``"running"`` when it was given up and ``"reason"`` why. A start that failed
(or overran ``start_timeout``) is kept by the host where it failed, with
``"kind": "failed"``, ``"to"`` that host, ``"since"`` when the start began,
``"running"`` when it ended and ``"reason"`` why.

A restore of the whole service to a snapshot is kept by the owner that
ends it, with ``"kind": "restore"``, ``"from"`` that host, ``"to"`` the
snapshot (or the point asked when none was chosen), ``"outcome"``
``done`` or ``undone`` and ``"reason"`` what was done or why not.

``since`` (wall clock) is, for a switch, when the operator asked for it
(the switch intent's time); for a takeover, the last time the new owner's
agent read the owner key still held by the previous owner, which is at most
one ``loop_interval`` before that owner's lease expired or was given back.
A crashed owner stopped up to ``[lease] ttl`` before: that part of the
outage is the lease's, and is not in ``duration``. ``running`` is when the
new owner's resources had all started.
"""

import json

from slaposha.cluster.etcd import Op
from slaposha.inputs import MAX_VALUE, NUMBER, InputError, check_fields, loads

__all__ = ['record', 'read']


# What a record holds (inputs.check_fields); another is not shown.
FIELDS = {'service': str, 'kind': str, 'from': (str, None), 'to': str,
          'token': int, 'since': NUMBER, 'running': NUMBER,
          'duration': NUMBER, 'by': (str, None), 'reason': (str, None),
          'outcome': (str, None)}


def record(client, keys, guard, entry, kept, compare=(), ops=()):
    """Write ``entry`` if ``guard`` (``Ownership.guard(token)``: the owner
    key still has our token) and ``compare`` hold, with ``ops`` in the same
    transaction, else return False; then drop the records beyond the newest
    ``kept``."""
    service = entry['service']
    key = keys.history(service) + '%020d' % entry['token']
    if entry['kind'] in ('abandoned', 'failed'):
        key += '-' + entry['kind']   # beside the start of the same owner
    elif entry['kind'] == 'restore':   # one owner may restore many times
        key += '-restore-%015d' % int(entry['running'] * 1000)
    result = client.txn(compare=list(guard) + list(compare),
                        success=[Op.put(key, json.dumps(
                            entry, sort_keys=True))] + list(ops))
    if not result.succeeded:
        return False
    old = sorted(kv.key for kv in client.get_prefix(keys.history(service)))
    drop = old[:-kept] if len(old) > kept else []
    if drop:
        client.txn(compare=[], success=[Op.delete(k) for k in drop])
    return True


def read(client, keys, service=None, timeout=None):
    """Every record kept (of ``service``, or of all), oldest first."""
    entries = []
    for kv in client.get_prefix(keys.history(service), timeout=timeout):
        try:
            entries.append(check_fields(loads(kv.value, MAX_VALUE, kv.key),
                                        FIELDS, kv.key))
        except InputError:
            continue   # not one of ours: nothing to show
    entries.sort(key=lambda e: (e.get('running') or 0, e.get('token') or 0))
    return entries
