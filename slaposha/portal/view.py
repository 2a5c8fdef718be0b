"""The portal's aggregated view, composed from what each cluster said
(:meth:`slaposha.portal.feed.ClusterFeed.snapshot`): plain JSON-able
values, the same for the page, the JSON API and the tests.

A cluster is ``connecting`` (no answer yet), ``unreachable`` (no agent
answers: its last known state is kept, with when it was seen), ``degraded``
(it answers, and ``problems`` says what is wrong and where, one line each)
or ``ok``. A service is ``up``, ``warn``, ``down`` or ``starting`` (as
``slaposha status`` says), and may be frozen.
"""

from slaposha.portal.feed import certificate_may_act
from slaposha.verdict import problems as status_problems, service_state

__all__ = ['cluster_view', 'service_view', 'select', 'Filters',
           'CLUSTER_STATES', 'SERVICE_STATES']

CLUSTER_STATES = ('ok', 'degraded', 'unreachable', 'connecting')
SERVICE_STATES = ('up', 'warn', 'down', 'starting', 'frozen')


def _locals_by_host(snap):
    """{host: (its /local answer, when)} of the agents that answered."""
    found = {}
    for answer in snap['answers'].values():
        local = answer.get('local')
        if isinstance(local, dict) and local.get('host'):
            found[local['host']] = (local, answer['at'])
    return found


def service_view(name, svc, status, locals_by_host):
    """One service of a cluster's status, with each host's standby
    freshness (from that host's own view)."""
    hosts = status.get('hosts') or {}
    entry = {
        'name': name, 'state': service_state(svc),
        'owner': svc.get('owner'), 'token': svc.get('token'),
        'orchestrate': svc.get('orchestrate'),
        'frozen': svc.get('frozen'), 'switch': svc.get('switch'),
        'operation': svc.get('operation'), 'abandoned': svc.get('abandoned'),
        'target': svc.get('target'),
        'resources': svc.get('resources') or [], 'hosts': [],
    }
    for host in svc.get('hosts') or []:
        on = (svc.get('on') or {}).get(host)
        owner = host == svc.get('owner')
        why = ((hosts.get(host) or {}).get('ineligible') or {}).get(name)
        local, at = locals_by_host.get(host, (None, None))
        mine = ((local or {}).get('services') or {}).get(name) or {}
        entry['hosts'].append({
            'name': host, 'role': 'owner' if owner else 'standby',
            'alive': bool((hosts.get(host) or {}).get('alive')),
            'state': (on or {}).get('state'),
            'decision': (on or {}).get('decision'),
            'eligible': None if owner or on is None else not why,
            'why': why,
            'lags': None if owner else mine.get('lags'),
            'lags_at': None if owner or not mine else at,
            # Data an old owner wrote that the live copy lacks, kept on
            # this host (`slaposha data diverged list` there).
            'diverged': [c for c in (on or {}).get('diverged') or ()
                         if isinstance(c, dict)],
        })
    return entry


def cluster_view(snap, history_kept=20, user_may_act=False):
    """One cluster as the portal shows it."""
    status = snap['status'] or {}
    answers = snap['answers']
    entry = {
        'name': snap['name'], 'site': snap['site'],
        'cluster': status.get('cluster'), 'etcd': status.get('etcd'),
        'via': snap['status_via'],
        # A stream cut off by the network says nothing until its timeout.
        'streaming': None if snap['unreachable'] else snap['streaming'],
        'seen': snap['status_at'], 'error': snap['unreachable'],
        'certificate': snap['whoami'] or {'role': snap['cert_role']},
        'may_act': False, 'problems': [], 'hosts': [], 'services': [],
        'history': (snap['history'] or [])[-history_kept:],
        'agents': [{'url': url, 'host': (answers.get(url) or {}).get('host'),
                    'error': (answers.get(url) or {}).get('error'),
                    'at': (answers.get(url) or {}).get('at')}
                   for url in snap['endpoints']],
    }
    entry['may_act'] = user_may_act and certificate_may_act(
        snap['whoami'], snap['cert_role'])
    if snap['unreachable']:
        entry['state'] = 'unreachable'
        entry['problems'].append(snap['unreachable'])
    elif snap['status'] is None:
        entry['state'] = 'connecting'
    locals_by_host = _locals_by_host(snap)
    problems = entry['problems']
    for name, h in (status.get('hosts') or {}).items():
        local = locals_by_host.get(name, (None, None))[0] or {}
        entry['hosts'].append({
            'name': name, 'role': h.get('role'), 'address': h.get('address'),
            'alive': bool(h.get('alive')), 'failed': h.get('failed') or [],
            'ineligible': h.get('ineligible') or {},
            'cannot_run': h.get('cannot_run'), 'lease': local.get('lease'),
        })
    if snap['status'] is not None and status.get('etcd') != 'ok':
        problems.append('etcd, seen from %s: %s' % (status.get('host'),
                                                    status.get('etcd')))
    services = {name: svc for name, svc in
                (status.get('services') or {}).items()
                if isinstance(svc, dict)}
    # What is wrong and where, as `slaposha status` says it.
    problems.extend(status_problems(dict(status, services=services),
                                    etcd=False))
    for name, svc in services.items():
        entry['services'].append(service_view(name, svc, status,
                                              locals_by_host))
    if not snap['unreachable']:
        for agent in entry['agents']:
            if agent['error']:
                problems.append('the API of %s does not answer: %s' % (
                    agent['host'] or agent['url'], agent['error']))
        for host, (local, at) in sorted(locals_by_host.items()):
            if local.get('etcd', 'ok') != 'ok':
                problems.append('the agent of %s: %s' % (host,
                                                         local['etcd']))
    if 'state' not in entry:
        entry['state'] = 'degraded' if problems else 'ok'
    return entry


class Filters(object):
    """Which clusters and services to show: names of clusters, sites, and
    states (a cluster state keeps whole clusters in that state, a service
    state the services in it). Empty: everything."""

    def __init__(self, clusters=(), sites=(), states=()):
        self.clusters = set(clusters)
        self.sites = set(sites)
        self.states = set(states)

    def __bool__(self):
        return bool(self.clusters or self.sites or self.states)

    def as_dict(self):
        return {'cluster': sorted(self.clusters), 'site': sorted(self.sites),
                'state': sorted(self.states)}


def _service_states(service):
    return {service['state']} | ({'frozen'} if service['frozen'] else set())


def select(clusters, filters):
    """The clusters (views) that ``filters`` keep, each with the services
    it keeps."""
    kept = []
    for cluster in clusters:
        if filters.clusters and cluster['name'] not in filters.clusters:
            continue
        if filters.sites and cluster['site'] not in filters.sites:
            continue
        if filters.states and cluster['state'] not in filters.states:
            services = [s for s in cluster['services']
                        if _service_states(s) & filters.states]
            if not services:
                continue
            cluster = dict(cluster, services=services)
        kept.append(cluster)
    return kept
