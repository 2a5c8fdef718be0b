"""The status tree, as OpenSVC prints it: what runs where, and why."""

import time

from slaposha.verdict import service_state, verdict

__all__ = ['render']

def _when(decision):
    if not decision:
        return ''
    return time.strftime('%H:%M:%S', time.localtime(decision[0]))


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
