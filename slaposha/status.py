"""What the agent says of itself and of the cluster.

- ``agent.local_status()``: this agent's own view, readable without etcd
  (written to ``agent.json`` in the run folder after every cycle, and by
  the lease thread when it suspends or resumes services);
- ``agent.cluster_status()``: the whole cluster as etcd knows it (hosts,
  services with their owner, intents, operation in progress, the etcd
  members), with the local view; when etcd cannot be read, the local view
  and why;
- ``agent.history()``: the takeovers and switches kept in etcd;
- what this host announces to the others with its lease (its health: the
  services it failed, may not take over, keeps diverged copies of).

``slaposha status`` prints them as a tree.
"""

import json
import logging
import os
import threading
import time

from slaposha import __version__, history, intents
from slaposha.cluster.etcd import EtcdError
from slaposha.replication import ReplicationError
from slaposha.slot import RUNNING

__all__ = ['Status']

# Its lines are the agent's.
logger = logging.getLogger('slaposha.agent')


class Status(object):
    """The agent's part that tells its status, to the APIs, the status
    file and the other hosts."""

    def local_status(self):
        """This agent's own view, readable without etcd."""
        lease = self.lease
        return {
            'host': self.host, 'pid': os.getpid(), 'version': __version__,
            'time': time.time(),
            'lease': None if lease is None else {
                'id': '%x' % lease.id, 'valid': lease.valid,
                'time_left': round(lease.time_left(), 3),
                'lost': lease.lost_reason,
                # Seconds since the deadline suspended the services.
                'suspended': None if lease.suspended_since is None else
                round(time.monotonic() - lease.suspended_since, 1)},
            'etcd': self.etcd_problem or 'ok',
            'cannot_run': self.cannot_run,
            'broken': dict(self.broken),
            'services': {
                name: {'state': 'suspended' if slot.suspended is not None
                       else slot.state, 'owner': slot.owner,
                       'token': slot.token, 'decision': slot.decision,
                       'resources': slot.resources,
                       'owner_token': slot.owner_token,
                       'ineligible': slot.ineligible,
                       'failed': slot.failed_until > time.monotonic(),
                       'lags': {rid: None if lag is None else round(lag, 3)
                                for rid, lag in slot.lags.items()}}
                for name, slot in self.slots.items()},
        }

    def cluster_status(self):
        """The whole cluster as etcd knows it, with this agent's view; when
        etcd cannot be read, the local view and why."""
        status = {'cluster': self.cluster.name, 'host': self.host,
                  'local': self.local_status(), 'etcd': 'ok'}
        try:
            views = intents.read(self.client, self.keys)
            alive = self.membership.alive()
            last = {e['service']: e for e in history.read(self.client,
                                                          self.keys)}
        except EtcdError as e:
            status['etcd'] = 'cannot read the cluster: %s' % e
            return status
        status['hosts'] = {
            name: dict(alive.get(name) or {}, alive=name in alive,
                       role='witness' if name in
                       self.cluster.cluster.witnesses else 'host')
            for name in self.cluster.members}
        services = {}
        for name, conf in sorted(self.confs.items()):
            view = views.get(name) or intents.View(name)
            published = view.state if view.owner and view.state and \
                view.state.get('host') == view.owner.value else None
            services[name] = {
                'orchestrate': conf.service.orchestrate,
                'exclusive': conf.service.exclusive,
                'hosts': conf.service.hosts,
                'owner': view.owner.value if view.owner else None,
                'token': view.owner.create_revision if view.owner else None,
                'frozen': view.frozen, 'target': view.target,
                'switch': view.switch,
                'operation': self._operation(conf.service, view, alive),
                'abandoned': last.get(name) if (last.get(name) or {}).get(
                    'kind') == 'abandoned' else None,
                'restore': view.restore,
                'restored': last.get(name) if (last.get(name) or {}).get(
                    'kind') == 'restore' else None,
                'resources': (published or {}).get('resources', []),
                'details': (published or {}).get('details', {}),
                'facts': view.facts,
                'on': {h: (alive.get(h) or {}).get('services', {}).get(name)
                       for h in conf.service.hosts},
            }
        status['services'] = services
        status['etcd_members'] = self.etcd_view.read()
        return status

    def _operation(self, conf, view, alive):
        """The switch or restore in progress, with its stage and deadline,
        or None."""
        restore = view.restore
        if restore and 'unreadable' not in restore:
            at = restore.get('at') if isinstance(restore.get('at'),
                                                (int, float)) else None
            owner = view.owner.value if view.owner else None
            host = restore.get('host')
            state = ((alive.get(host) or {}).get('services', {}).get(
                view.name) or {}).get('state')
            return {'kind': 'restore', 'to': restore.get('point'),
                    'by': restore.get('by'), 'at': at,
                    'stage': ('asked of %s' if state == RUNNING else
                              'restoring on %s') % host if owner == host and
                    view.owner.create_revision == restore.get('token') else
                    'ending: %s no longer owns it' % host,
                    'deadline': None if at is None else
                    at + 2 * (conf.stop_timeout + conf.start_timeout)}
        switch = view.switch
        if not switch or not switch.get('to'):
            return None
        to, owner = switch['to'], view.owner.value if view.owner else None
        at = switch.get('at') if isinstance(switch.get('at'),
                                            (int, float)) else None
        running = ((alive.get(owner) or {}).get('services', {}).get(
            view.name) or {}).get('state') == 'running' if owner else False
        if owner is None:
            stage = 'waiting for %s to take it' % to
        elif owner != to:
            stage = 'stopping on %s' % owner
        elif not running:
            stage = 'starting on %s' % to
        else:
            stage = 'running on %s' % to
        return {'kind': 'switch', 'to': to, 'by': switch.get('by'),
                'at': at, 'stage': stage,
                'deadline': None if at is None else
                at + conf.stop_timeout + conf.start_timeout}

    def write_status(self):
        # The loop and the lease thread write it.
        tmp = '%s.%d.tmp' % (self.status_path, threading.get_ident())
        try:
            with open(tmp, 'w') as f:
                json.dump(self.local_status(), f)
            os.rename(tmp, self.status_path)
        except OSError:
            pass

    def _health(self):
        now = time.monotonic()
        health = {
            'address': self.cluster.hosts[self.host].address,
            'pid': os.getpid(), 'version': __version__,
            'failed': sorted(n for n, s in self.slots.items()
                             if s.failed_until > now),
            'ineligible': dict({n: s.ineligible[0] for n, s in
                                self.slots.items() if s.ineligible}, **{
                n: 'its service file does not load here: %s' % why
                for n, why in self.broken.items()}),
            'reports': {n: s.report for n, s in self.slots.items()
                        if s.report and not s.token},
            'services': {n: dict({'state': s.state, 'decision': s.decision},
                                 **self._diverged(s))
                         for n, s in self.slots.items()},
        }
        if self.cannot_run:
            health['cannot_run'] = self.cannot_run
        return health

    def _diverged(self, slot):
        """{'diverged': [...]} when this host keeps diverged copies of the
        service's data (each data resource's retention applied), looked at
        every monitor_interval; a resource that cannot tell is skipped."""
        now = time.monotonic()
        if now >= slot.next_diverged:
            slot.next_diverged = now + self.cluster.agent.monitor_interval
            found = []
            for res in slot.service.data():
                try:
                    copies = res.diverged_copies()
                except (ReplicationError, OSError) as e:
                    logger.warning('%s: %s: cannot list the diverged'
                                   ' copies: %s', slot.service.name, res.rid,
                                   e)
                    continue
                found += [{'rid': res.rid, 'id': d['id'], 'at': d['at'],
                           'token': d.get('token'), 'size': d.get('size'),
                           'reason': d.get('reason')} for d in copies]
            slot.diverged = found
        return {'diverged': slot.diverged} if slot.diverged else {}

    def history(self):
        """The takeovers and switches kept in etcd, oldest first."""
        return history.read(self.client, self.keys)
