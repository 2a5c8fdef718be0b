"""What the agent counts, and the Prometheus text exposition of it
(``GET /metrics`` on the HTTPS API; every name, type and label is listed in
docs/metrics.rst)::

    agent.metrics = Metrics()
    agent.metrics.decided('web', 'start')      # in Agent.decide
    agent.metrics.moved('web', 'switch', 1.2)  # a takeover or switch here
    agent.metrics.renewed(0.004)               # a lease renewal's latency
    text = exposition(agent)                   # the /metrics page

Gauges (ownership, tokens, lease, resource states, replication lags) are
read from the agent when the page is asked for; only what cannot be read
afterwards (counts, latencies) is kept here. Counters start at 0 when the
agent starts, as Prometheus expects of a restarted process.
"""

import threading
import time

__all__ = ['Metrics', 'exposition', 'CONTENT_TYPE', 'RENEW_BUCKETS']

CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8'

# Lease renewals take a few milliseconds; request_timeout (0.5 s) ends them.
RENEW_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                 1.0)

# Every state a resource can be in (slaposha.resources), so that a state
# left shows as 0 instead of vanishing.
RESOURCE_STATES = ('up', 'warn', 'down', 'n/a')


class Metrics(object):
    """The counters and the histogram of one agent (thread-safe: the loop,
    the lease thread and the API threads use it)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.decisions = {}        # (service, action): count
        self.moves = {}            # (service, kind): count
        self.last_move = {}        # (service, kind): seconds
        self.renew_counts = [0] * len(RENEW_BUCKETS)
        self.renew_sum = 0.0
        self.renew_count = 0

    def decided(self, service, action):
        with self._lock:
            key = (service, action)
            self.decisions[key] = self.decisions.get(key, 0) + 1

    def moved(self, service, kind, seconds):
        """A ``takeover`` or ``switch`` of ``service`` ended on this host
        after ``seconds``."""
        with self._lock:
            key = (service, kind)
            self.moves[key] = self.moves.get(key, 0) + 1
            self.last_move[key] = seconds

    def renewed(self, seconds):
        with self._lock:
            self.renew_count += 1
            self.renew_sum += seconds
            for i, bound in enumerate(RENEW_BUCKETS):
                if seconds <= bound:
                    self.renew_counts[i] += 1

    def snapshot(self):
        with self._lock:
            return (dict(self.decisions), dict(self.moves),
                    dict(self.last_move), list(self.renew_counts),
                    self.renew_sum, self.renew_count)


# -- the text format ----------------------------------------------------------

def _escape(value):
    return str(value).replace('\\', '\\\\').replace('\n', '\\n') \
        .replace('"', '\\"')


def _number(value):
    if isinstance(value, bool):
        return '1' if value else '0'
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


class _Page(object):
    def __init__(self):
        self.lines = []

    def family(self, name, kind, doc, samples):
        """``samples``: [(labels dict, value)] or [(suffix, labels, value)]."""
        self.lines.append('# HELP %s %s' % (name, doc))
        self.lines.append('# TYPE %s %s' % (name, kind))
        for sample in samples:
            suffix, labels, value = sample if len(sample) == 3 else \
                ('',) + tuple(sample)
            if value is None:
                continue
            text = ','.join('%s="%s"' % (k, _escape(v))
                            for k, v in sorted(labels.items()))
            self.lines.append('%s%s%s %s' % (name, suffix, '{%s}' % text
                                             if text else '', _number(value)))

    def text(self):
        return '\n'.join(self.lines) + '\n'


def exposition(agent):
    """The /metrics page of ``agent``: what it owns and runs (from
    ``local_status()``), its :class:`Metrics` (``metrics``), and the
    replication, snapshots and exports of its services (``slots``)."""
    local = agent.local_status()
    host = local.get('host')
    services = local.get('services') or {}
    lease = local.get('lease') or {}
    page = _Page()
    page.family('slaposha_agent_info', 'gauge', 'The agent of this host'
                ' (always 1; its labels say which).', [
                    ({'host': host, 'version': local.get('version')}, 1)])
    page.family('slaposha_etcd_reachable', 'gauge', '1 when the agent'
                ' read the cluster from etcd in its last cycle.',
                [({}, local.get('etcd') == 'ok')])
    page.family('slaposha_lease_valid', 'gauge', '1 while this host holds'
                ' its lease.', [({}, bool(lease.get('valid')))])
    page.family('slaposha_lease_remaining_seconds', 'gauge', 'Time left'
                ' before the self-fence deadline of the lease (0 when not'
                ' held).', [({}, float(lease.get('time_left') or 0.0))])
    page.family('slaposha_service_owner', 'gauge', '1 on the host that holds'
                ' the owner key of the service.',
                [({'service': n}, bool(s.get('token')))
                 for n, s in sorted(services.items())])
    page.family('slaposha_service_running', 'gauge', '1 where the service'
                ' runs.', [({'service': n}, s.get('state') == 'running')
                           for n, s in sorted(services.items())])
    page.family('slaposha_service_owner_token', 'gauge', 'Fencing token of'
                ' the owner as this host last read it (absent: no owner).',
                [({'service': n}, s.get('owner_token', s.get('token')))
                 for n, s in sorted(services.items())])
    page.family('slaposha_service_eligible', 'gauge', 'On a standby: 1 when'
                ' this host may take the service over by itself.',
                [({'service': n}, not s.get('ineligible'))
                 for n, s in sorted(services.items())
                 if not s.get('token') and 'ineligible' in s])
    page.family('slaposha_resource_state', 'gauge', 'State of each resource'
                ' where the service runs: 1 for its state, 0 for the others.',
                [({'service': n, 'resource': r[0], 'state': state},
                  r[1] == state)
                 for n, s in sorted(services.items())
                 for r in s.get('resources') or []
                 for state in RESOURCE_STATES])
    metrics = agent.metrics
    decisions, moves, last_move, buckets, total, count = \
        metrics.snapshot()
    names = sorted(services)
    page.family('slaposha_takeovers_total', 'counter', 'Services this'
                ' host took over after their owner was lost.',
                [({'service': n}, moves.get((n, 'takeover'), 0))
                 for n in names])
    page.family('slaposha_switches_total', 'counter', 'Planned switches'
                ' that ended with the service running on this host.',
                [({'service': n}, moves.get((n, 'switch'), 0))
                 for n in names])
    page.family('slaposha_move_duration_seconds', 'gauge', 'Duration of'
                ' the last takeover or switch to this host (see'
                ' docs/metrics.rst for where it is measured from).',
                [({'service': n, 'kind': k}, v)
                 for (n, k), v in sorted(last_move.items())])
    page.family('slaposha_decisions_total', 'counter', 'Decisions of'
                ' this agent, by service and action (start, stop,'
                ' standby, wait, fence, ...).',
                [({'service': n, 'action': a}, v)
                 for (n, a), v in sorted(decisions.items())])
    samples = [('_bucket', {'le': repr(b)}, c)
               for b, c in zip(RENEW_BUCKETS, buckets)]
    samples += [('_bucket', {'le': '+Inf'}, count),
                ('_sum', {}, total), ('_count', {}, count)]
    page.family('slaposha_lease_renew_seconds', 'histogram', 'Time one'
                ' lease renewal (keepalive) took to be answered.',
                samples)
    _replication(agent, page)
    _backups(agent, page)
    _exports(agent, page)
    return page.text()


def _replication(agent, page):
    """Per data resource and peer: on the owner, how old each standby's
    copy is and what was sent; on a standby, how old its own copy is."""
    lags, sent, seconds, transfers, rates, ages = [], [], [], [], [], []
    for name, slot in sorted(agent.slots.items()):
        for res in slot.service.data():
            labels = {'service': name, 'resource': res.rid}
            try:
                sender = res.sender if res.running else None
                for peer in res.peers if sender is not None else ():
                    lag, _ = sender.lag(peer.name)
                    lags.append((dict(labels, peer=peer.name), lag))
                for peer, (n, s, t) in sorted(getattr(res, 'sent',
                                                      {}).items()):
                    peer_labels = dict(labels, peer=peer)
                    sent.append((peer_labels, n))
                    seconds.append((peer_labels, s))
                    transfers.append((peer_labels, t))
                last = getattr(res, 'last', None)
                if sender is not None and last is not None:
                    for peer, t in sorted(last.results.items()):
                        if not t.skipped and t.seconds > 0:
                            rates.append((dict(labels, peer=peer),
                                          t.bytes / t.seconds))
                if sender is None:
                    age, _ = res.lag()
                    ages.append((labels, age))
            except Exception:  # a scrape never breaks on a volume's mood
                continue
    page.family('slaposha_replication_lag_seconds', 'gauge', 'On the'
                ' owner: age of the newest copy each standby has.', lags)
    page.family('slaposha_replication_sent_bytes_total', 'counter', 'Bytes'
                ' of snapshots sent to each standby.', sent)
    page.family('slaposha_replication_send_seconds_total', 'counter', 'Time'
                ' spent sending snapshots to each standby (sent bytes over'
                ' it: the throughput).', seconds)
    page.family('slaposha_replication_transfers_total', 'counter',
                'Snapshots sent to each standby (those it had already are'
                ' not counted).', transfers)
    page.family('slaposha_replication_rate_bytes_per_second', 'gauge',
                'Throughput of the last snapshot sent to each standby.',
                rates)
    page.family('slaposha_replication_copy_age_seconds', 'gauge', 'On a'
                ' standby: age of the newest complete copy held here.', ages)


def _backups(agent, page):
    """Per btrfs resource, on every host that holds a copy: the snapshots
    kept here and how old the oldest is (how far back a restore can go)."""
    counts, oldest = [], []
    now = time.time()
    for name, slot in sorted(agent.slots.items()):
        for res in slot.service.resources:
            volume = getattr(res, 'volume', None)
            if not hasattr(volume, 'retention'):
                continue  # not a btrfs volume
            labels = {'service': name, 'resource': res.rid}
            try:
                snapshots = volume.snapshots()
                counts.append((labels, len(snapshots)))
                dated = [volume.meta(s.name).get('created')
                         for s in snapshots]
                dated = [d for d in dated if isinstance(d, (int, float))]
                if dated:
                    oldest.append((labels, max(0.0, now - min(dated))))
            except Exception:  # a scrape never breaks on a volume's mood
                continue
    page.family('slaposha_backup_snapshots', 'gauge', 'Snapshots of the'
                ' volume kept on this host (backups and replication\'s'
                ' own).', counts)
    page.family('slaposha_backup_oldest_age_seconds', 'gauge', 'Age of the'
                ' oldest snapshot kept on this host: how far back a restore'
                ' can go here.', oldest)


def _exports(agent, page):
    """Per export task, on the host that runs it (the owner): when the
    newest export in its folder was made, its size, and whether the last
    run failed."""
    when, size, failed = [], [], []
    for name, slot in sorted(agent.slots.items()):
        for res in slot.service.resources:
            if getattr(res, 'kind', None) != 'export' or not res.enabled:
                continue
            labels = {'service': name, 'resource': res.rid}
            newest, bad = res.exported()
            failed.append((labels, 1 if bad else 0))
            if newest and isinstance(newest.get('exported'), (int, float)):
                when.append((labels, newest['exported']))
                size.append((labels, newest.get('bytes') or 0))
    page.family('slaposha_export_last_timestamp_seconds', 'gauge', 'When'
                ' the newest export in the folder was made (Unix time).',
                when)
    page.family('slaposha_export_last_bytes', 'gauge', 'Size of the newest'
                ' export in the folder.', size)
    page.family('slaposha_export_failed', 'gauge', '1 when the last export'
                ' run failed.', failed)
