"""Backups of a service's btrfs data: what each host keeps, and restores.

The snapshots that replication takes and :mod:`slaposha.replication.
retention` keeps are the backups; this module is what an operator does
with them on one host, the one the command runs on (every host that holds
a copy keeps its own):

- :func:`listing`: the snapshots held here, with when, by which owner
  (token, host) each was taken, the space only it holds (what deleting it
  would free) and why it is kept.
- :func:`choose`: the snapshot for ``--at``: a name, or the newest taken at
  or before a time (``2026-12-04 12:30``, UTC unless it says otherwise, or
  ``90s ago``).
- :func:`restore_path`: one folder (a partition) copied out of a snapshot
  next to the live data, without stopping the service: the copy goes to a
  new folder, nothing existing is written; a copy that fails or passes its
  deadline is deleted, so it ends done or undone.

Every mistake a user can make is a :class:`BackupError`: one line.
"""

import datetime
import os
import re
import shutil
import subprocess
import time

from slaposha.replication import ReplicationError
from slaposha.replication.btrfs import NAME_RE, Volume
from slaposha.replication.retention import Retention

__all__ = ['BackupError', 'volumes_of', 'listing', 'choose', 'parse_time',
           'restore_path', 'format_time']


class BackupError(Exception):
    """What went wrong, in one line."""


def volumes_of(service):
    """The btrfs volumes of a ServiceConfig, each with the retention its
    resource sets. BackupError when it has none."""
    volumes = []
    for section in service.resources:
        if section.kind == 'btrfs':
            volume = Volume(section.volume)
            volume.retention = Retention(section.minutely, section.hourly,
                                         section.daily, section.weekly)
            volumes.append(volume)
    if not volumes:
        raise BackupError('%s: service %s has no [btrfs#...] resource: only'
                          ' btrfs copies keep snapshots' % (
                              service.path, service.name))
    return volumes


def format_time(when):
    if when is None:
        return '?'
    return datetime.datetime.fromtimestamp(when, datetime.timezone.utc) \
        .strftime('%Y-%m-%d %H:%M:%S')


def _exclusive(paths, timeout=120):
    """{path: bytes held only by it} from ``btrfs filesystem du`` (which
    needs no quotas); {} when it cannot tell within ``timeout``."""
    if not paths:
        return {}
    try:
        p = subprocess.run(['btrfs', 'filesystem', 'du', '-s', '--raw']
                           + list(paths), stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL,
                           universal_newlines=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    sizes = {}
    for line in p.stdout.splitlines():
        fields = line.split(None, 3)
        if len(fields) == 4 and fields[1].isdigit():
            sizes[fields[3]] = int(fields[1])
    return sizes


def listing(volume, sizes=True):
    """The snapshots held here, oldest first: dicts of ``name``,
    ``created`` (wall clock), ``token``, ``host`` (the owner that took it),
    ``size`` (bytes only it holds; None when unknown) and ``kept`` (why:
    ``newest``, ``peer hB``, ``live``, ``minutely``... ``hourly``...)."""
    try:
        snapshots = volume.snapshots()
        state = volume.state()
    except (ReplicationError, OSError) as e:
        raise BackupError(str(e))
    names = [s.name for s in snapshots]
    metas = dict((name, volume.meta(name)) for name in names)
    policy = volume.retention.keepers(
        names, lambda n: metas[n].get('created')) if volume.retention else {}
    exclusive = _exclusive([s.path for s in snapshots]) if sizes else {}
    rows = []
    for i, snap in enumerate(snapshots):
        kept = []
        if i == len(snapshots) - 1:
            kept.append('newest')
        kept += ['peer %s' % peer for peer, name in
                 sorted(state['peers'].items()) if name == snap.name]
        if state['live'] == snap.name:
            kept.append('live')
        kept += policy.get(snap.name, [])
        meta = metas[snap.name]
        rows.append({'name': snap.name, 'created': meta.get('created'),
                     'token': snap.token, 'host': meta.get('host'),
                     'size': exclusive.get(snap.path), 'kept': kept,
                     'path': snap.path})
    return rows


_AGO_RE = re.compile(r'^\s*([0-9]*\.?[0-9]+)\s*(s|m|h|d)\s+ago\s*$')
_AGO_UNITS = {'s': 1, 'm': 60, 'h': 3600, 'd': 86400}


def parse_time(text, now=None):
    """Wall-clock seconds of ``text``: ``2026-12-04 12:30[:05]`` or
    ``2026-12-04T12:30:05+01:00`` (UTC unless it names an offset), or
    ``90s ago`` / ``5m ago`` / ``2h ago`` / ``1d ago``."""
    m = _AGO_RE.match(text)
    if m:
        now = time.time() if now is None else now
        return now - float(m.group(1)) * _AGO_UNITS[m.group(2)]
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise BackupError('--at %s: expected a snapshot name, a time such as'
                          ' "2026-12-04 12:30" (UTC) or "5m ago"' % text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return when.timestamp()


def choose(volume, at, now=None):
    """(the Snapshot for ``at``, when it was taken): the snapshot named
    ``at``, or the newest taken at or before the time ``at``."""
    if NAME_RE.match(at.strip()):
        snap = volume.get(at.strip())
        if snap is None:
            raise BackupError('%s: no complete snapshot %s on this host' % (
                volume.path, at.strip()))
        return snap, volume.meta(snap.name).get('created')
    when = parse_time(at, now)
    best = None
    for snap in volume.snapshots():
        created = volume.meta(snap.name).get('created')
        if created is not None and created <= when and \
                (best is None or created >= best[1]):
            best = (snap, created)
    if best is None:
        raise BackupError('%s: no snapshot on this host was taken at or'
                          ' before %s UTC' % (volume.path, format_time(when)))
    return best


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip('/') + '/')


def restore_path(volume, snap, path, to, timeout=3600):
    """Copy folder or file ``path`` of the live volume (absolute, or
    relative to the volume) as it was in snapshot ``snap`` to ``to``, a
    path that must not exist yet. Shared extents where the file system
    allows (``cp --reflink=auto``): on the same btrfs, nearly free. Returns
    (the copy's path, files, bytes, seconds)."""
    rel = os.path.relpath(path, volume.path) if os.path.isabs(path) \
        else os.path.normpath(path)
    if rel == '..' or rel.startswith('../') or os.path.isabs(rel):
        raise BackupError('--path %s: not inside the volume %s' % (
            path, volume.path))
    source = os.path.normpath(os.path.join(snap.path, rel))
    if not os.path.lexists(source):
        raise BackupError('--path %s: not in snapshot %s' % (path, snap.name))
    to = os.path.abspath(to)
    if os.path.lexists(to):
        raise BackupError('--to %s: exists already; a restore never writes'
                          ' over anything' % to)
    if _inside(to, volume.snapdir):
        raise BackupError('--to %s: inside the snapshots folder %s' % (
            to, volume.snapdir))
    if not os.path.isdir(os.path.dirname(to)):
        raise BackupError('--to %s: its folder %s does not exist' % (
            to, os.path.dirname(to)))
    started = time.monotonic()
    try:
        p = subprocess.run(['cp', '-a', '--reflink=auto', source, to],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           universal_newlines=True, timeout=timeout)
        failed = p.returncode and (p.stderr.strip().splitlines() or
                                   ['cp exit %d' % p.returncode])[-1]
    except subprocess.TimeoutExpired:
        failed = 'not done within %ds' % timeout
    except OSError as e:
        failed = 'cannot run cp: %s' % (e.strerror or e)
    if failed:
        _undo(to)
        raise BackupError('restore of %s from %s to %s failed, nothing kept:'
                          ' %s' % (rel, snap.name, to, failed))
    files, size = 0, 0
    for folder, _, names in os.walk(to):
        for name in names:
            files += 1
            try:
                size += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    if not os.path.isdir(to):
        files, size = 1, os.lstat(to).st_size
    return to, files, size, time.monotonic() - started


def _undo(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass
