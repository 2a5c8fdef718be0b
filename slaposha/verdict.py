"""What a cluster status (``GET /status``) says is wrong and where, worst
first, one short item each: the verdict that opens ``slaposha status``,
stands under ``slaposha mon``'s title and heads each cluster of the
portal; and a service's state in one word (up, warn, down, starting),
which the portal filters by.
"""

__all__ = ['service_state', 'problems', 'verdict']

# Characters of one problem in the verdict line.
ITEM = 120


def service_state(svc):
    """up, warn (up, degraded: a resource in warn, e.g. a partition set
    aside), down or starting, from what the owner published (the portal
    shows and filters the same words)."""
    if not svc.get('owner'):
        return 'down'
    states = [r[1] for r in svc.get('resources') or []]
    if not states:
        return 'starting'
    if any(s == 'down' for s in states):
        return 'down'
    if any(s == 'warn' for s in states):
        return 'warn'
    return 'up'


def _short(text):
    text = ' '.join(str(text).split())
    return text if len(text) <= ITEM else text[:ITEM - 3] + '...'


def problems(status, etcd=True):
    """What is wrong and where, one short item each: etcd, this agent's
    lease, hosts down or that cannot run services, services down, degraded
    (the first resource not up, on its owner), frozen, not eligible on a
    live host or failed there, a move in progress (``etcd``: and etcd
    itself)."""
    found = []
    if etcd and status.get('etcd', 'ok') != 'ok':
        found.append('etcd: %s' % status['etcd'])
    local = status.get('local') or {}
    lease = local.get('lease')
    if lease and lease.get('suspended') is not None:
        found.append('%s: services suspended: lease renewal late since'
                     ' %.1fs' % (status.get('host'), lease['suspended']))
    elif lease and not lease.get('valid'):
        found.append('%s: lease lost%s' % (status.get('host'), ': %s' % lease[
            'lost'] if lease.get('lost') else ''))
    for name, why in sorted((local.get('broken') or {}).items()):
        found.append('%s does not run %s: %s' % (status.get('host'), name,
                                                  why))
    hosts = status.get('hosts') or {}
    down = set()
    for name, h in sorted(hosts.items()):
        if h.get('role') == 'witness':
            continue  # no agent: its etcd member says (below)
        if not h.get('alive'):
            down.add(name)
            found.append('host %s down' % name)
        elif h.get('cannot_run'):
            found.append('host %s: its agent %s' % (name, h['cannot_run']))
    for member in status.get('etcd_members') or ():
        if member.get('reachable') is False and member.get('name') not in down:
            found.append('etcd member %s out of reach: %s' % (
                member.get('name'), member.get('error')))
    for name, svc in sorted((status.get('services') or {}).items()):
        state = service_state(svc)
        owner = svc.get('owner')
        frozen = svc.get('frozen')
        if frozen:
            found.append('%s frozen%s: the agents neither start nor move it'
                         % (name, ' by %s' % frozen['by']
                            if frozen.get('by') else ''))
        if state == 'down' and not owner:
            if (svc.get('target') or {}).get('state') == 'stopped' or \
                    frozen:
                continue  # stopped or frozen on purpose
            why = [on['decision'][2] for on in (svc.get('on') or {}).values()
                   if on and on.get('decision')]
            found.append('%s down%s' % (name, ': %s' % why[0] if why else ''))
        elif state in ('down', 'warn'):
            bad = [(rid, st, msg) for rid, st, msg in svc.get('resources')
                   or [] if st in ('down', 'warn')]
            # A failed or late export is the service's own line: the data
            # and the service are fine where they run.
            exports = [msg for rid, st, msg in bad
                       if rid.startswith('export#')]
            bad = [b for b in bad if not b[0].startswith('export#')]
            if bad or not exports:
                found.append('%s %s on %s%s' % (
                    name, state, owner, ': %s %s' % (bad[0][0], bad[0][2])
                    if bad else ''))
            found.extend('%s: %s' % (name, msg) for msg in exports)
        if svc.get('switch'):
            stage = (svc.get('operation') or {}).get('stage')
            found.append('%s: switch to %s in progress%s' % (
                name, svc['switch'].get('to'), ': %s' % stage if stage
                else ''))
        if svc.get('restore'):
            stage = (svc.get('operation') or {}).get('stage')
            found.append('%s: restore to %s in progress%s' % (
                name, svc['restore'].get('point'), ': %s' % stage if stage
                else ''))
        for host in svc.get('hosts') or ():
            h = hosts.get(host) or {}
            if host == owner or not h.get('alive'):
                continue
            why = (h.get('ineligible') or {}).get(name)
            if why:
                found.append('%s not eligible on %s: %s' % (name, host, why))
            elif name in (h.get('failed') or ()):
                found.append('%s failed on %s' % (name, host))
    return [_short(item) for item in found]


def verdict(status, etcd=True):
    """One line: 'ok: ...' or '! N problem(s): ...', the worst first."""
    found = problems(status, etcd)
    if not found:
        services = status.get('services')
        if services is None:
            return ''  # etcd out of reach: nothing known to be fine
        up = sum(1 for svc in services.values() if svc.get('owner'))
        return 'ok: %d of %d service(s) running, every host alive' % (
            up, len(services))
    more = ' (and %d more)' % (len(found) - 3) if len(found) > 3 else ''
    return '! %d problem(s): %s%s' % (len(found), '; '.join(found[:3]), more)
