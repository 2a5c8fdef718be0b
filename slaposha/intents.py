"""What operators want of a service, stored in etcd beside its owner key.

Keys under ``services/<name>/`` (see :mod:`slaposha.cluster.keys`):

- ``owner``: the owner host; its create revision is the fencing token;
- ``state``: what the owner publishes (guarded by its token);
- ``facts``: what the owner's resources say a standby must match (the
  SlapOS node's paths, uids, software releases), guarded likewise;
- ``frozen``: present while frozen: the agents neither start nor stop it;
- ``target``: ``{"state": "started" | "stopped", "host": ...}``: an
  operator's start (optionally on a host) or stop;
- ``switch``: ``{"to": host}``: a planned move, cleared by the new owner
  once the service runs there;
- ``restore``: ``{"point": "5m ago", "when": time, "snapshot": name,
  "host": owner, "token": its token}``: the whole service back to a
  snapshot (the newest taken at or before ``when``, or the one named), run
  by that owner and cleared by whichever owner ends it, done or undone
  (the history says which).

Intents are JSON objects that say who set them and when, so that status can
tell why the agents do what they do. They are an operator's, not an
owner's: they are not guarded by a fencing token.
"""

import json
import time
from collections import namedtuple

from slaposha.cluster.etcd import Compare, Op
from slaposha.inputs import MAX_VALUE, NUMBER, InputError, check_fields, loads

__all__ = ['View', 'read', 'views', 'set_frozen', 'set_target', 'set_switch',
           'clear', 'who']


class View(namedtuple('View',
                      'name owner state frozen target switch facts'
                      ' restore')):
    """Everything etcd holds about one service. ``owner`` is the KeyValue of
    the owner key (or None); the others are decoded JSON (or None)."""

    def __new__(cls, name, owner=None, state=None, frozen=None, target=None,
                switch=None, facts=None, restore=None):
        return super().__new__(cls, name, owner, state, frozen, target,
                               switch, facts, restore)


# What the agents read of each intent (inputs.check_fields). One that is
# not JSON or has other fields shows as {"unreadable": why}: read as no
# target and no switch, and, for safety, as frozen.
_WHO = {'by': (str, None), 'at': NUMBER + (None,), 'reason': (str, None)}
FIELDS = {
    'frozen': _WHO,
    'target': dict(_WHO, state=str, host=(str, None)),
    'switch': dict(_WHO, to=str, force=(bool, None)),
    'restore': dict(_WHO, point=str, when=NUMBER + (None,),
                    snapshot=(str, None), host=str, token=int),
}


def _decode(text, field):
    """The JSON object of the value of ``field``, bounded (other hosts
    and operators write it) and checked; else {"unreadable": why}."""
    try:
        value = loads(text, MAX_VALUE, field, require=None)
        if not isinstance(value, dict):
            value = {'value': value}
        return check_fields(value, FIELDS.get(field, {}), field)
    except InputError as e:
        return {'unreadable': str(e)}


def read(client, keys, timeout=None):
    """{service name: View} in one read of the services prefix."""
    return views(client.get_prefix(keys.services, timeout=timeout), keys)


def views(kvs, keys):
    """{service name: View} of the KeyValues of the services prefix (other
    keys are left out), as read or as a watch keeps them."""
    fields = {}
    for kv in kvs:
        if not kv.key.startswith(keys.services):
            continue
        name, _, field = kv.key[len(keys.services):].partition('/')
        entry = fields.setdefault(name, {})
        if field == 'owner':
            entry['owner'] = kv
        elif field in View._fields:
            entry[field] = _decode(kv.value, field)
    return {name: View(name, **entry) for name, entry in fields.items()}


def _intent(by, **values):
    values.update(by=by, at=time.time())
    return json.dumps(values, sort_keys=True)


def set_frozen(client, keys, name, frozen, by, reason=None):
    key = keys.service(name, 'frozen')
    if frozen:
        client.put(key, _intent(by, reason=reason))
    else:
        client.delete(key)


def set_target(client, keys, name, state, by, host=None, reason=None):
    client.put(keys.service(name, 'target'),
               _intent(by, state=state, host=host, reason=reason))


def set_switch(client, keys, name, to, by, force=False):
    """``force``: the target takes it even if it is not eligible (its data
    too stale, for instance): an operator's decision, recorded as such."""
    values = {'to': to}
    if force:
        values['force'] = True
    client.put(keys.service(name, 'switch'), _intent(by, **values))


def set_restore(client, keys, name, point, when, snapshot, host, token,
                by):
    """Ask the owner ``host`` (epoch ``token``) to bring the service back
    to a snapshot; only if no restore is asked yet (False otherwise)."""
    key = keys.service(name, 'restore')
    result = client.txn(
        compare=[Compare.version(key, '==', 0)],
        success=[Op.put(key, _intent(by, point=point, when=when,
                                     snapshot=snapshot, host=host,
                                     token=token))])
    return result.succeeded


def clear(client, keys, name, field):
    client.txn(compare=[], success=[Op.delete(keys.service(name, field))])


def who(intent):
    """'operator on hA at 12:00:01' from an intent's by/at."""
    if not intent:
        return 'nobody'
    if 'unreadable' in intent:
        return 'someone (%s)' % intent['unreadable']
    when = intent.get('at')
    stamp = time.strftime(' at %H:%M:%S', time.localtime(when)) \
        if isinstance(when, (int, float)) else ''
    text = '%s%s' % (intent.get('by', 'someone'), stamp)
    if intent.get('reason'):
        text += ' (%s)' % intent['reason']
    return text
