"""The cron entries that run a SlapOS node, disabled and brought back.

A node installed the usual way runs slapgrid from cron: the package's
/etc/cron.d/slapos-node runs ``slapos node software`` and ``instance``
every minute, ``report`` and ``format`` every hour
(reference/slapos-internals.md 1.4). Under slaposha only the owner of the
node may run them, as ``task`` resources of its service, so the entries are
disabled on every host of the service: commented out with a mark, in the
same file, so that ``slaposha slapos release`` can bring them back as they
were. Both are idempotent.
"""

import os
import re
from collections import namedtuple

from slaposha.slapos.files import write_atomic

__all__ = ['Entry', 'entries', 'disable', 'enable', 'every', 'CRON_DIR',
           'MARK']

CRON_DIR = '/etc/cron.d'
CRONTAB = '/etc/crontab'
# What starts a line disabled by slaposha.
MARK = '#slaposha-disabled# '

_NODE = re.compile(r'\bslapos\s+node\b')
_ASSIGN = re.compile(r'^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$')

# One entry of a system cron file: where it is, its timing (the five fields
# or an @word), its user, its command (variables of the file expanded), and
# whether slaposha disabled it.
Entry = namedtuple('Entry', 'path line timing user command disabled')


def _files(cron_dir, crontab):
    found = []
    try:
        names = sorted(os.listdir(cron_dir))
    except OSError:
        names = []
    for name in names:
        # cron's own rule: names with dots (package leftovers) are skipped.
        path = os.path.join(cron_dir, name)
        if '.' not in name and os.path.isfile(path):
            found.append(path)
    if crontab and os.path.isfile(crontab):
        found.append(crontab)
    return found


def _parse(path, text):
    variables = {}
    found = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        disabled = line.startswith(MARK.strip())
        if disabled:
            line = line[len(MARK.strip()):].strip()
        if not line or line.startswith('#'):
            continue
        assign = _ASSIGN.match(line)
        if assign:
            variables[assign.group(1)] = assign.group(2).strip('"\'')
            continue
        fields = line.split(None, 1 if line.startswith('@') else 5)
        count = 2 if line.startswith('@') else 6
        if len(fields) < count:
            continue
        timing = fields[0] if count == 2 else ' '.join(fields[:5])
        rest = fields[-1].split(None, 1)
        if len(rest) < 2:
            continue
        user, command = rest
        expanded = re.sub(r'\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?',
                          lambda m: variables.get(m.group(1), m.group(0)),
                          command)
        if _NODE.search(expanded):
            found.append(Entry(path, number, timing, user, expanded,
                               disabled))
    return found


def entries(cron_dir=CRON_DIR, crontab=CRONTAB):
    """Every entry of the system cron files that runs `slapos node`."""
    found = []
    for path in _files(cron_dir, crontab):
        try:
            with open(path) as f:
                found.extend(_parse(path, f.read()))
        except (OSError, UnicodeDecodeError):
            continue
    return found


def _rewrite(path, change):
    with open(path) as f:
        lines = f.read().splitlines(True)
    new = [change(number, line) for number, line in enumerate(lines, 1)]
    if new == lines:
        return 0
    write_atomic(path, ''.join(new))
    return sum(1 for a, b in zip(lines, new) if a != b)


def disable(found):
    """Comment out these entries (from :func:`entries`) in their files;
    returns how many lines changed (0 when they were already)."""
    changed = 0
    for path in sorted({e.path for e in found if not e.disabled}):
        numbers = {e.line for e in found if e.path == path and
                   not e.disabled}
        changed += _rewrite(path, lambda n, line: MARK + line
                            if n in numbers else line)
    return changed


def enable(found):
    """Bring back the entries slaposha disabled; returns how many."""
    changed = 0
    for path in sorted({e.path for e in found if e.disabled}):
        numbers = {e.line for e in found if e.path == path and e.disabled}

        def back(n, line):
            if n in numbers and line.lstrip().startswith(MARK.strip()):
                line = line.lstrip()[len(MARK.strip()):]
                return line[1:] if line.startswith(' ') else line
            return line
        changed += _rewrite(path, back)
    return changed


def every(timing):
    """Seconds between two runs of a cron timing, for a ``task``'s
    schedule: None for @reboot (never a task: `slapos node boot` deletes
    every .timestamp), else a period close to what cron does."""
    words = {'@hourly': 3600, '@daily': 86400, '@midnight': 86400,
             '@weekly': 7 * 86400, '@monthly': 30 * 86400,
             '@yearly': 365 * 86400, '@annually': 365 * 86400}
    if timing.startswith('@'):
        return words.get(timing)
    minute, hour, day, month, weekday = timing.split()

    def step(field, unit):
        if field == '*':
            return unit
        m = re.match(r'^\*/([0-9]+)$', field)
        return unit * int(m.group(1)) if m else None
    if (day, month) != ('*', '*') or weekday != '*':
        return 86400 if (month, weekday) == ('*', '*') else 7 * 86400
    every_minute = step(minute, 60)
    if hour == '*':
        return every_minute or 3600
    every_hour = step(hour, 3600)
    return every_hour or 86400
