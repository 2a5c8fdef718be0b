"""The status tree, as OpenSVC prints it: what runs where, and why."""

import time

__all__ = ['render', 'service_state', 'problems', 'verdict']

# Characters of one problem in the verdict line.
ITEM = 120


def _when(decision):
    if not decision:
        return ''
    return time.strftime('%H:%M:%S', time.localtime(decision[0]))


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


def _intent_text(label, intent):
    if not intent:
        return None
    when = intent.get('at')
    stamp = time.strftime(' %H:%M:%S', time.localtime(when)) \
        if isinstance(when, (int, float)) else ''
    text = '%s by %s%s' % (label, intent.get('by', '?'), stamp)
    if intent.get('reason'):
        text += ': %s' % intent['reason']
    return text


def _diverged_lines(copies):
    """A host's diverged copies of a service, one line each: which data,
    its id (for `slaposha data diverged drop`), when, the owner's token
    that wrote it, its size."""
    from slaposha.replication import human_bytes
    return ['    diverged %-14s %s  %s  token %s  %s' % (
        c.get('rid'), c.get('id'),
        time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(c.get('at') or 0)),
        c.get('token') if c.get('token') is not None else '?',
        human_bytes(c['size']) if c.get('size') is not None else 'size ?')
        for c in copies]


def render(status, only=None):
    """Lines of the tree for a /status answer."""
    lines = []
    local = status.get('local', {})
    lines.append(('cluster %s   etcd %s   (seen from %s)   %s' % (
        status.get('cluster'), status.get('etcd'), status.get('host'),
        verdict(status, etcd=False))).rstrip())
    lease = local.get('lease')
    if lease and lease.get('suspended') is not None:
        lines.append('  lease %s SUSPENDED: lease renewal late since %.1fs:'
                     ' services frozen until it is renewed or lost' % (
                         lease['id'], lease['suspended']))
    elif lease:
        lines.append('  lease %s %s, %.1f s left%s' % (
            lease['id'], 'held' if lease['valid'] else 'LOST',
            lease['time_left'],
            ': %s' % lease['lost'] if lease.get('lost') else ''))
    hosts = status.get('hosts')
    if hosts:
        lines.append('  hosts')
        for name, h in hosts.items():
            if h.get('role') == 'witness':
                lines.append('    %-8s witness  (runs only an etcd member)'
                             % name)
                continue
            lines.append('    %-8s %-8s %s%s%s' % (
                name, 'alive' if h.get('alive') else 'DOWN',
                h.get('address', ''),
                '  failed: %s' % ' '.join(h['failed'])
                if h.get('failed') else '',
                '  not eligible: %s' % ' '.join(sorted(h['ineligible']))
                if h.get('ineligible') else ''))
            if h.get('cannot_run'):
                lines.append('      ! its agent %s' % h['cannot_run'])
    services = status.get('services')
    if services is None:
        # etcd out of reach: what this agent alone knows.
        lines.append('  cluster view unavailable; this host\'s view:')
        if local.get('cannot_run'):
            lines.append('  ! this agent %s' % local['cannot_run'])
        for name, svc in sorted(local.get('services', {}).items()):
            if only and name != only:
                continue
            d = svc.get('decision')
            lines.append('  %-10s %-8s %s' % (
                name, svc.get('state'),
                '%s: %s (%s)' % (d[1], d[2], _when(d)) if d else ''))
        return lines
    for name, svc in services.items():
        if only and name != only:
            continue
        head = '%-10s %-8s' % (name, service_state(svc))
        if svc.get('owner'):
            head += ' on %s (token %s)' % (svc['owner'], svc['token'])
        else:
            head += ' not running anywhere'
        head += '   orchestrate %s   hosts %s' % (
            svc.get('orchestrate'), ' '.join(svc.get('hosts', [])))
        if svc.get('exclusive'):
            head += '   exclusive %s' % ' '.join(svc['exclusive'])
        lines.append(head)
        for label, key in (('FROZEN', 'frozen'), ('switch', 'switch'),
                           ('target', 'target')):
            intent = svc.get(key)
            if key == 'target' and intent and \
                    intent.get('state') == 'started' and \
                    not intent.get('host'):
                continue
            text = _intent_text(label if key != 'target' else
                                (intent or {}).get('state', ''), intent)
            if key == 'switch' and intent:
                text = 'switch to %s requested by %s' % (
                    intent.get('to'), intent.get('by'))
                op = svc.get('operation') or {}
                if op.get('stage'):
                    text += ': %s' % op['stage']
                if isinstance(op.get('deadline'), (int, float)):
                    text += ', deadline %s' % time.strftime(
                        '%H:%M:%S', time.localtime(op['deadline']))
            if intent and 'unreadable' in intent:
                text = '%s: %s' % (key, intent['unreadable'])
            if text:
                lines.append('  ! %s' % text)
        restore = svc.get('restore')
        if restore:
            op = svc.get('operation') or {}
            lines.append('  ! restore to %s requested by %s%s%s' % (
                restore.get('point'), restore.get('by'),
                ': %s' % op['stage'] if op.get('stage') else '',
                ', deadline %s' % time.strftime('%H:%M:%S', time.localtime(
                    op['deadline'])) if isinstance(op.get('deadline'), (
                        int, float)) else ''))
        ended = svc.get('restored')
        if ended and not restore:
            lines.append('  %s restore to %s %s at %s after %.1f s: %s' % (
                '!' if ended.get('outcome') != 'done' else ' ',
                ended.get('to'), ended.get('outcome'), time.strftime(
                    '%H:%M:%S', time.localtime(ended.get('running') or 0)),
                ended.get('duration') or 0, ended.get('reason')))
        gone = svc.get('abandoned')
        if gone and not svc.get('switch'):
            lines.append('  ! switch to %s abandoned at %s after %.1f s: %s'
                         % (gone.get('to'), time.strftime('%H:%M:%S',
                            time.localtime(gone.get('running') or 0)),
                            gone.get('duration') or 0, gone.get('reason')))
        for host in svc.get('hosts', []):
            on = (svc.get('on') or {}).get(host)
            if on is None:
                lines.append('  %-8s %-12s' % (host, 'unknown (down)'))
                continue
            d = on.get('decision')
            lines.append('  %-8s %-12s %s' % (
                host, on.get('state'),
                '%s: %s (%s)' % (d[1], d[2], _when(d)) if d else ''))
            lines.extend(_diverged_lines(on.get('diverged') or ()))
            if host == svc.get('owner'):
                details = svc.get('details') or {}
                for rid, state, message in svc.get('resources') or []:
                    lines.append('    %-14s %-5s %s' % (rid, state, message))
                    lines.extend('      %s' % line
                                 for line in details.get(rid) or ())
    return lines
