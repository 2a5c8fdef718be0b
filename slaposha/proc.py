"""What the kernel says about processes and mounts, read from /proc.

One reader each for what several parts of slaposha need: when a process
started (to tell it from a later process that reuses its number), the boot
(a marker written before a reboot is stale), and the mounts of this mount
namespace (which file system holds a path, what is mounted on a folder).
"""

import os

__all__ = ['start_time', 'boot_id', 'Mount', 'mounts', 'mounts_at',
           'mount_holding']


def start_time(pid):
    """When process ``pid`` started, in clock ticks since boot; None when it
    is gone or a zombie (dead, not yet reaped)."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except (OSError, TypeError):
        return None
    try:
        return None if fields[0] in ('Z', 'X') else int(fields[19])
    except (IndexError, ValueError):
        return None


def boot_id():
    """This boot's id (it changes at every boot), or None."""
    try:
        with open('/proc/sys/kernel/random/boot_id') as f:
            return f.read().strip()
    except OSError:
        return None


def _unescape(field):
    # mountinfo writes space, tab, newline and backslash as \ooo.
    if '\\' not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == '\\' and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return ''.join(out)


class Mount(object):
    """One line of /proc/self/mountinfo."""

    def __init__(self, line):
        fields = line.split()
        sep = fields.index('-')
        self.root = _unescape(fields[3])
        self.mount_point = _unescape(fields[4])
        self.fstype = fields[sep + 1]
        self.source = _unescape(fields[sep + 2])

    def __str__(self):
        return '%s (%s)' % (self.source, self.fstype)


def mounts():
    """Every mount of this mount namespace, in mount order."""
    with open('/proc/self/mountinfo') as f:
        return [Mount(line) for line in f]


def mounts_at(path):
    """The mounts on ``path``, bottom first: the last one is what is seen
    there."""
    return [m for m in mounts() if m.mount_point == path]


def mount_holding(path):
    """The mount that holds ``path`` (the deepest mount point above it, the
    last mounted there), or None."""
    where = os.path.realpath(path)
    best = None
    for mount in mounts():
        point = mount.mount_point
        if where == point or where.startswith(point.rstrip('/') + '/'):
            if best is None or len(point) >= len(best.mount_point):
                best = mount
    return best
