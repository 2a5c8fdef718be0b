"""``slaposha mon``: the cluster on one screen, redrawn as it changes, as
OpenSVC's ``om mon``: hosts and their health, etcd members, each service
with its owner and token, each standby's eligibility and freshness, the
last decision of each host, and the last takeovers.

Over the HTTPS API (``--api``) the frames follow the agent's event stream
(/events); the unix socket serves no stream, so locally the status is read
every ``REFRESH`` seconds, the rate at which the agent itself checks it for
the stream. Plain ANSI (cursor home, erase line), no curses.
"""

import time

from slaposha.inputs import one_line
from slaposha.units import human_seconds
from slaposha.verdict import service_state, verdict

__all__ = ['frame', 'REFRESH', 'HISTORY_LINES']

REFRESH = 0.5        # seconds between two reads of the local socket
HISTORY_LINES = 5    # takeovers and switches shown

HOME, ERASE_LINE, ERASE_BELOW = '\x1b[H', '\x1b[K', '\x1b[J'
HIDE_CURSOR, SHOW_CURSOR = '\x1b[?25l', '\x1b[?25h'


def _clock(t):
    return time.strftime('%H:%M:%S', time.localtime(t)) if t else '--:--:--'


def frame(status, history=None, note=None):
    """The lines of one frame, from a /status answer and /history entries."""
    local = status.get('local') or {}
    lines = ['cluster %s   seen from %s at %s   etcd %s%s' % (
        status.get('cluster'), status.get('host'), _clock(local.get('time')),
        status.get('etcd'), '   [%s]' % note if note else '')]
    said = verdict(status, etcd=False)
    if said:
        lines.append(said)
    hosts = status.get('hosts')
    lines.append('')
    lines.append('HOSTS')
    if hosts is None:
        lines.append('  (cluster view unavailable: %s)' % status.get('etcd'))
    for name, h in (hosts or {}).items():
        if h.get('role') == 'witness':
            lines.append('  %-8s witness' % name)
            continue
        notes = []
        if h.get('failed'):
            notes.append('failed: %s' % ' '.join(h['failed']))
        for svc, why in sorted((h.get('ineligible') or {}).items()):
            notes.append('may not take %s: %s' % (svc, why))
        lease = ''
        if name == status.get('host') and local.get('lease'):
            lease = 'lease %s %.1f s' % (
                'held' if local['lease'].get('valid') else 'LOST',
                local['lease'].get('time_left') or 0.0)
        lines.append('  %-8s %-7s %-15s %-16s %s' % (
            name, 'alive' if h.get('alive') else 'DOWN',
            h.get('address', ''), lease, '; '.join(notes)))
    members = status.get('etcd_members')
    if members:
        lines.append('')
        lines.append('ETCD')
        for m in members:
            if m.get('reachable'):
                lines.append('  %-8s %-8s v%-8s term %-4s %s' % (
                    m['name'], 'leader' if m.get('leader') else 'follower',
                    m.get('version'), m.get('raft_term'), m['endpoint']))
            else:
                lines.append('  %-8s UNREACHABLE  %s' % (
                    m['name'], m.get('error', '')))
    services = status.get('services')
    lines.append('')
    lines.append('SERVICES')
    if services is None:
        for name, svc in sorted((local.get('services') or {}).items()):
            d = svc.get('decision')
            lines.append('  %-10s %-8s (this host)  %s' % (
                name, svc.get('state'), '%s: %s' % (d[1], d[2]) if d else ''))
    for name, svc in (services or {}).items():
        lines.append('  %-10s %-8s %s%s' % (
            name, service_state(svc),
            'owner %s token %s' % (svc['owner'], svc['token'])
            if svc.get('owner') else 'no owner',
            '   FROZEN' if svc.get('frozen') else ''))
        lags = ((local.get('services') or {}).get(name) or {}).get('lags') \
            or {}
        for host in svc.get('hosts', []):
            on = (svc.get('on') or {}).get(host)
            if host == svc.get('owner'):
                role = 'owner'
            elif on is None:
                role = 'down'
            else:
                why = ((hosts or {}).get(host, {}).get('ineligible')
                       or {}).get(name)
                role = 'INELIGIBLE' if why else 'eligible'
            fresh = ''
            if host == status.get('host') and role != 'owner' and lags:
                fresh = ' '.join('%s %s old' % (rid, human_seconds(lag))
                                 for rid, lag in sorted(lags.items())
                                 if lag is not None)
            d = (on or {}).get('decision')
            lines.append('    %-8s %-10s %-9s %s%s' % (
                host, role, (on or {}).get('state', '-'),
                '%s %s: %s' % (_clock(d[0]), d[1], d[2]) if d else '',
                '  [%s]' % fresh if fresh else ''))
        for rid, state, message in svc.get('resources') or []:
            lines.append('      %-14s %-5s %s' % (rid, state, message))
    if history:
        lines.append('')
        lines.append('LAST TAKEOVERS AND SWITCHES')
        for e in history[-HISTORY_LINES:][::-1]:
            lines.append('  %s %-10s %-8s %s -> %s  token %s  %.2f s' % (
                _clock(e.get('running')), e.get('service'), e.get('kind'),
                e.get('from') or '-', e.get('to'), e.get('token'),
                e.get('duration') or 0.0) + (
                    ': %s' % e['reason'] if e.get('reason') else ''))
    return lines


def draw(write, lines, width=None):
    """Redraw in place: cursor home, each line over the old one, the rest
    of the old frame erased."""
    out = [HOME]
    for line in lines:
        out.append((line[:width] if width else line) + ERASE_LINE + '\n')
    out.append(ERASE_BELOW)
    write(''.join(out))


def tokens(status):
    return sorted((name, svc.get('token')) for name, svc in
                  (status.get('services') or {}).items())


def main_loop(read_status, read_history, events=None, errors=(),
              out=None):
    """Redraw until Ctrl-C. ``events``: a callable yielding (event, data)
    of an event stream (the HTTPS API); else ``read_status`` is called every
    REFRESH seconds. A lost agent (``errors``: the exceptions that say so)
    leaves the last frame with a note and is tried again each second.
    Returns the exit code."""
    import shutil
    import sys
    out = out or sys.stdout
    tty = out.isatty()
    state = {'status': None, 'history': None, 'tokens': None}

    def show(status, note=None):
        if status is None:
            status = {'cluster': '?', 'host': '?', 'etcd': '?'}
        if tokens(status) != state['tokens'] and 'services' in status:
            state['tokens'] = tokens(status)
            state['history'] = read_history()
        lines = frame(status, state['history'], note)
        if tty:
            draw(out.write, lines, shutil.get_terminal_size().columns)
        else:
            out.write('\n'.join(lines) + '\n\n')
        out.flush()

    if tty:
        out.write(HIDE_CURSOR + HOME + ERASE_BELOW)
    try:
        while True:
            try:
                if events is None:
                    state['status'] = read_status()
                    show(state['status'], 'live, every %g s' % REFRESH)
                    time.sleep(REFRESH)
                    continue
                for event, data in events():
                    if event == 'status' and isinstance(data, dict):
                        state['status'] = data
                        show(data, 'live')
                show(state['status'], 'the event stream ended; retrying')
                time.sleep(1.0)
            except errors as e:
                show(state['status'], 'agent lost: %s; retrying'
                     % one_line(e, 100))
                time.sleep(1.0)
    except KeyboardInterrupt:
        return 0
    finally:
        if tty:
            out.write(SHOW_CURSOR)
            out.flush()
