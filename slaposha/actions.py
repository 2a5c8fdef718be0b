"""Operators' actions, as the APIs hand them to the agent:
``agent.action(name, verb, params)`` records an intent in etcd (frozen, a
target state, a switch, a restore: :mod:`slaposha.intents`) and returns one
line; the agents' cycles carry it out. What cannot be done raises
:class:`ActionError`, one line that says why, before anything is recorded.
"""

import time

from slaposha import intents, placement
from slaposha.backup import BackupError, parse_time
from slaposha.cluster.etcd import EtcdError
from slaposha.replication.volume import NAME_RE as SNAPSHOT_RE
from slaposha.slot import RUNNING

__all__ = ['Actions', 'ActionError']


class ActionError(Exception):
    """An operator action that cannot be done, as one line."""


class Actions(object):
    """The agent's part that takes operators' actions (from the APIs'
    threads, through its ``action_client``: they may wait out an etcd
    election)."""

    def action(self, name, verb, params=None):
        """Record an operator's intent; the cycles carry it out. Returns a
        one-line message; raises ActionError for what cannot be done."""
        params = params or {}
        if name not in self.confs:
            raise ActionError('no service %r (services: %s)' % (
                name, ', '.join(sorted(self.confs)) or 'none'))
        conf = self.confs[name].service
        by = params.get('by') or 'operator on %s' % self.host
        client = self.action_client
        try:
            views = intents.read(client, self.keys)
            view = views.get(name) or intents.View(name)
            if verb == 'freeze':
                intents.set_frozen(client, self.keys, name, True, by=by)
                return '%s frozen: the agents will neither start nor stop' \
                    ' it' % name
            if verb == 'thaw':
                intents.set_frozen(client, self.keys, name, False, by=by)
                return '%s thawed' % name
            if verb == 'stop':
                intents.set_target(client, self.keys, name, 'stopped',
                                   by=by)
                intents.clear(client, self.keys, name, 'switch')
                return '%s: stopping%s' % (name, ' (frozen: nothing happens'
                                           ' until thawed)' if view.frozen
                                           else '')
            if verb == 'restore':
                return self._ask_restore(name, view, params, by, client)
            if verb in ('start', 'switch', 'takeover'):
                to = params.get('to')
                if verb == 'takeover' or (verb == 'start' and to is None and
                                          conf.orchestrate == 'manual'):
                    # A manual service starts where the operator is.
                    to = self.host
                if verb == 'switch' and not to:
                    raise ActionError('switch needs a host to move to (--to)')
                if to is not None and to not in conf.hosts:
                    raise ActionError('%s cannot run on %r: its hosts are %s'
                                      % (name, to, ' '.join(conf.hosts)))
                if view.frozen:
                    raise ActionError('%s is frozen by %s: thaw it first'
                                      % (name, intents.who(view.frozen)))
                if to is not None:
                    alive = self.membership.alive()
                    if to not in alive:
                        raise ActionError('%s is not alive (no agent holds a'
                                          ' lease there)' % to)
                    if alive[to].get('cannot_run'):
                        # Not even with force: it would own what it
                        # cannot run.
                        raise ActionError('%s cannot run %s: its agent %s'
                                          % (to, name,
                                             alive[to]['cannot_run']))
                    why = (alive[to].get('ineligible') or {}).get(name)
                    if why and not params.get('force'):
                        raise ActionError('%s may not run %s: %s'
                                          % (to, name, why))
                    # Not even with force: their paths collide there.
                    why = placement.blocking(self.confs, {
                        n: v.owner.value for n, v in views.items()
                        if v.owner}, self.confs[name], to)
                    if why:
                        raise ActionError('%s cannot run %s: %s' % (
                            to, name, why))
                if verb == 'start':
                    intents.set_target(client, self.keys, name,
                                       'started', host=to, by=by)
                    return '%s: starting%s' % (name, ' on %s' % to if to
                                               else '')
                if view.owner is not None and view.owner.value == to:
                    intents.set_target(client, self.keys, name,
                                       'started', by=by)
                    return '%s already runs on %s' % (name, to)
                intents.set_target(client, self.keys, name, 'started',
                                   by=by)
                intents.set_switch(client, self.keys, name, to, by=by,
                                   force=bool(params.get('force')))
                return '%s: moving to %s' % (name, to)
        except EtcdError as e:
            raise ActionError('etcd: %s' % e)
        raise ActionError('unknown action %r' % verb)

    def _ask_restore(self, name, view, params, by, client):
        """Record a restore of the whole service for its owner to run: the
        point is resolved here, when asked ("5m ago" is from now)."""
        conf = self.confs[name]
        point = (params.get('at') or '').strip()
        if not point:
            raise ActionError('restore needs a time or a snapshot name'
                              ' (--at)')
        kinds = [section.kind for section in conf.resources]
        for section in conf.resources:
            if section.kind in ('rsync', 'drbd'):
                raise ActionError('%s: [%s] keeps no snapshots: restore'
                                  ' --at is for btrfs data only' % (
                                      name, section.rid))
        if 'btrfs' not in kinds:
            raise ActionError('%s has no [btrfs#...] resource: only btrfs'
                              ' copies keep snapshots' % name)
        snapshot, when = None, None
        if SNAPSHOT_RE.match(point):
            snapshot = point
        else:
            try:
                when = parse_time(point)
            except BackupError as e:
                raise ActionError(str(e))
        if view.frozen:
            raise ActionError('%s is frozen by %s: thaw it first'
                              % (name, intents.who(view.frozen)))
        if view.restore:
            raise ActionError('%s: a restore is in progress already (%s,'
                              ' asked by %s)' % (
                                  name, view.restore.get('point'),
                                  intents.who(view.restore)))
        if view.switch:
            raise ActionError('%s: a switch to %s is in progress: restore'
                              ' once it ended' % (name,
                                                  view.switch.get('to')))
        if view.owner is None:
            raise ActionError('%s runs on no host: its owner restores it;'
                              ' start it first' % name)
        owner = view.owner.value
        state = ((self.membership.alive().get(owner) or {}).get(
            'services', {}).get(name) or {}).get('state')
        if state != RUNNING:
            raise ActionError('%s is not running on its owner %s (%s):'
                              ' restore once it runs' % (
                                  name, owner, state or 'no agent there'))
        if not intents.set_restore(client, self.keys, name, point, when,
                                   snapshot, owner, view.owner.create_revision,
                                   by):
            raise ActionError('%s: a restore is in progress already' % name)
        return '%s: restoring on %s to %s' % (
            name, owner, snapshot or 'the newest snapshot taken at or'
            ' before %s UTC' % time.strftime('%Y-%m-%d %H:%M:%S',
                                             time.gmtime(when)))
