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
- :func:`restore_live`: the whole volume back to a snapshot, for the
  owner's planned restore (the agent stops the service first and starts it
  after): the live volume is kept aside as a diverged copy (reason
  ``restore``), a writable snapshot of the chosen one becomes the live
  volume, and a read-only snapshot of it under the owner's token, newer
  than every other, is what the standbys receive next (incrementally from
  the newest snapshot they share: ``btrfs send -p`` needs no ancestry).
  The snapshots taken before stay as they were, restorable in turn.
  :func:`undo_restore` puts the previous live volume back.
- :func:`export`: a snapshot written to a file as a compressed ``btrfs
  send`` stream (zstd, or gzip where zstd is missing), incremental against
  the previous export in the same folder when asked, with its SHA-256
  (``FILE.sha256``, as ``sha256sum -c`` reads it) and what it is
  (``FILE.json``); :func:`import_export` checks the checksum and receives
  it among the snapshots of the volume on any host, where it is a snapshot
  like the others (``promote`` or the agent's start makes it live), but
  for its epoch: it is renamed ``<seq>-0`` (token 0, which no owner has),
  older than anything an owner writes. Under its own token (of another
  cluster, or of an owner since replaced) it could outrank the snapshots
  taken after it, and a later takeover would promote the old import
  instead of the newest data.
- :func:`prune_exports`: the retention of an export folder: the newest
  ``keep`` exports of a service, and every export one of them needs (its
  parent, its parent's parent...), the others deleted.

Every mistake a user can make is a :class:`BackupError`: one line.
"""

import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections import namedtuple

from slaposha.replication import ReplicationError
from slaposha.replication.retention import Retention
from slaposha.replication.store import alive
from slaposha.replication.volume import NAME_RE, Volume, snapshot_name

__all__ = ['BackupError', 'volumes_of', 'listing', 'choose', 'parse_time',
           'restore_path', 'restore_live', 'undo_restore', 'Restored',
           'format_time', 'export', 'import_export', 'exports_in',
           'prune_exports', 'trees_of', 'export_tree', 'import_tree']


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
        when = now - float(m.group(1)) * _AGO_UNITS[m.group(2)]
    else:
        try:
            when = datetime.datetime.fromisoformat(text.strip())
            if when.tzinfo is None:
                when = when.replace(tzinfo=datetime.timezone.utc)
            when = when.timestamp()
        except (ValueError, OverflowError):
            raise BackupError('--at %s: expected a snapshot name, a time such'
                              ' as "2026-12-04 12:30" (UTC) or "5m ago"'
                              % text)
    if not 0 <= when < 1e11:
        raise BackupError('--at %s: not a time snapshots can have been taken'
                          ' at' % text)
    return when


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


# -- the whole volume back to a snapshot ----------------------------------------

# What restore_live did: the snapshot restored and when it was taken, the
# snapshot the new live volume starts (``live``), the previous live volume
# kept aside (``aside``, its path; None when there was none) and the
# snapshot that one followed (``before``).
Restored = namedtuple('Restored', 'volume snapshot created live aside before')


def restore_live(volume, snap, token, host, reason):
    """Make snapshot ``snap`` the live volume of ``volume`` as the owner of
    epoch ``token``; the service must not run here. The live volume is kept
    aside (``reason``, e.g. ``restore to 000012-5 asked by ...``), never
    deleted. Returns a Restored; BackupError (one line) when it cannot be
    done, everything as it was."""
    try:
        with volume._locked() as state:
            if alive(state['active']):
                raise BackupError('%s: the service runs here (token %d):'
                                  ' it must be stopped first' % (
                                      volume.path, state['active']['token']))
            if token < state['token']:
                raise BackupError('%s: token %d is stale: a newer owner'
                                  ' (token %d) wrote here' % (
                                      volume.path, token, state['token']))
            if volume.get(snap.name) is None:
                raise BackupError('%s: snapshot %s is no longer here' % (
                    volume.path, snap.name))
            before, aside = state['live'], None
            if volume.exists():
                base = volume.get(before) if before else None
                volume._set_aside(state, volume.path, 'volume', reason,
                                  base.token if base else None)
                aside = state['diverged'][-1]['path']
            try:
                volume._run(['subvolume', 'snapshot', snap.path, volume.path],
                            'cannot make %s the live volume' % snap.name)
                seq = max([state['seq']] + [s.seq for s in
                                            volume.snapshots()]) + 1
                name = snapshot_name(seq, token)
                volume._write_meta(name, {
                    'created': volume.clock(), 'token': token, 'host': host,
                    'restored': snap.name})
                volume._run(['subvolume', 'snapshot', '-r', volume.path,
                             os.path.join(volume.snapdir, name)],
                            'cannot take snapshot %s' % name)
            except ReplicationError as e:
                _put_back(volume, state, aside, before, None)
                raise BackupError('restore of %s to %s failed, undone: %s' % (
                    volume.path, snap.name, e.message))
            state['seq'], state['live'] = seq, name
    except ReplicationError as e:
        raise BackupError(str(e))
    return Restored(volume, snap.name, volume.meta(snap.name).get('created'),
                    name, aside, before)


def undo_restore(restored, reason):
    """Put back the live volume that :func:`restore_live` kept aside (the
    service must not run here): the restored volume is kept aside in turn
    if it was written since (``reason``), else deleted, with the snapshots
    taken of it. Returns one line; BackupError when it cannot."""
    volume = restored.volume
    try:
        with volume._locked() as state:
            if alive(state['active']):
                raise BackupError('%s: the service runs here: it must be'
                                  ' stopped first' % volume.path)
            live = volume.get(restored.live)
            note = 'deleted the restored volume'
            if volume.exists():
                try:
                    changed = live is None or volume.changed_since(live)
                except ReplicationError:
                    changed = True   # unknown: keeping it is always safe
                if changed:
                    note = volume._set_aside(state, volume.path, 'volume',
                                             reason, live and live.token)
            _put_back(volume, state, restored.aside, restored.before,
                      live)
    except ReplicationError as e:
        raise BackupError(str(e))
    return '%s back as it was before the restore to %s; %s' % (
        volume.path, restored.snapshot, note)


def _put_back(volume, state, aside, before, live):
    """The live volume ``aside`` back in place (the one there, unless kept
    aside, deleted first), following ``before`` again; the snapshots of
    the restored lineage (``live`` and newer) deleted."""
    if volume.exists():
        volume._delete_subvolume(volume.path, 'cannot delete the restored'
                                 ' volume')
    if live is not None:
        for snap in volume.snapshots():
            if snap.key >= live.key:
                volume._delete_subvolume(snap.path, 'cannot delete snapshot'
                                         ' %s' % snap.name)
                volume._drop_meta(snap.name)
    if aside is not None:
        try:
            os.rename(aside, volume.path)
        except OSError as e:
            raise volume.error('cannot put %s back in place: %s' % (
                aside, e.strerror or e))
        state['diverged'] = [d for d in state['diverged']
                             if d['path'] != aside]
    state['live'] = before


# -- export and import ---------------------------------------------------------

CHUNK = 1 << 20
_COMPRESS = {'zst': (['zstd', '-q', '-T0', '-c'], ['zstd', '-q', '-d', '-c']),
             'gz': (['gzip', '-1', '-c'], ['gzip', '-d', '-c'])}


def _compression():
    return 'zst' if shutil.which('zstd') else 'gz'


def _pipeline(commands, stdin=None, stdout=subprocess.PIPE):
    """Start commands piped into each other; (processes, their stderr
    files)."""
    procs, errs = [], []
    for i, args in enumerate(commands):
        err = tempfile.TemporaryFile()
        last = i == len(commands) - 1
        proc = subprocess.Popen(
            args, stdin=procs[-1].stdout if procs else stdin,
            stdout=stdout if last else subprocess.PIPE, stderr=err)
        if procs:
            procs[-1].stdout.close()  # the next one owns it now
        procs.append(proc)
        errs.append(err)
    return procs, errs


def _failure(procs, errs, commands):
    """The first step that failed, in one line, or None."""
    for proc, err, args in zip(procs, errs, commands):
        if proc.returncode:
            err.seek(0)
            text = err.read().decode(errors='replace').strip()
            return '%s: %s' % (args[0], text.splitlines()[-1] if text
                               else 'exit %d' % proc.returncode)
    return None


def _deadline(procs, timeout):
    """A timer that kills ``procs`` after ``timeout``; .fired tells."""
    timer = threading.Timer(timeout, lambda: [p.kill() for p in procs
                                              if p.poll() is None])
    timer.daemon = True
    timer.start()
    return timer


def exports_in(folder, volume, label=None):
    """The exports of ``volume`` (None: any) in ``folder`` (their .json),
    oldest first; with ``label``, only those of that service (SlapOS nodes
    share their paths, so services may share a volume's path)."""
    found = []
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for name in names:
        if not name.endswith('.json'):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                meta = json.load(f)
            if not isinstance(meta, dict) or (
                    volume is not None and meta.get('volume') != volume.path) \
                    or (label is not None and meta.get('service') != label):
                continue
            if os.path.exists(os.path.join(folder, name[:-5])):
                meta['file'] = os.path.join(folder, name[:-5])
                found.append(meta)
        except (OSError, ValueError, AttributeError):
            continue
    return sorted(found, key=lambda m: (m.get('created') or 0,
                                        m.get('snapshot') or ''))


def _chain(exports, meta):
    """How many exports importing ``meta`` takes (itself and its parents,
    transitively, as found in ``exports``)."""
    n, seen = 1, set()
    while meta.get('parent') and meta['parent'] not in seen:
        seen.add(meta['parent'])
        parents = [m for m in exports if m.get('snapshot') == meta['parent']]
        if not parents:
            break
        meta, n = parents[-1], n + 1
    return n


def export(volume, snap, to, label, incremental=False, timeout=3600,
           full_every=None):
    """Write ``snap`` to ``to`` (a file, or a folder where it gets its own
    name), incremental from the newest previous export in that folder whose
    snapshot this host still has when ``incremental``; full all the same
    when that one ends a chain of ``full_every`` exports (so that the
    retention of the folder can delete old chains). Returns the export's
    description (a dict, also in FILE.json)."""
    to = os.path.abspath(to)
    folder, path = (to, None) if os.path.isdir(to) else \
        (os.path.dirname(to), to)
    if not os.path.isdir(folder):
        raise BackupError('--to %s: no such folder' % folder)
    parent, note = None, 'full'
    if incremental:
        previous = [m for m in exports_in(folder, volume, label)
                    if m.get('snapshot') != snap.name]
        long_chain = False
        for meta in reversed(previous):
            candidate = volume.get(meta.get('snapshot'))
            if candidate is not None and candidate.key < snap.key:
                if full_every and _chain(previous, meta) >= full_every:
                    long_chain = True
                else:
                    parent = candidate
                break
        note = 'incremental after %s' % parent.name if parent else \
            'full: the previous export ends a chain of %d' % full_every \
            if long_chain else 'full: no earlier export in %s whose' \
            ' snapshot this host still has' % folder
    comp = _compression()
    if path is None:
        path = os.path.join(folder, '%s-%s-%s%s.btrfs.%s' % (
            label, volume.name, snap.name,
            '-after-%s' % parent.name if parent else '', comp))
    elif not path.endswith('.' + comp):
        raise BackupError('--to %s: the file name must end with .%s (%s'
                          ' compression)' % (path, comp, comp))
    for p in (path, path + '.sha256', path + '.json'):
        if os.path.lexists(p):
            raise BackupError('--to %s: exists already; an export never'
                              ' writes over anything' % p)
    commands = [['btrfs', 'send', '-q'] + (['-p', parent.path] if parent
                                          else []) + [snap.path],
                _COMPRESS[comp][0]]
    started = time.monotonic()
    # Marked, replication's pruning spares it while it is sent and then as
    # the parent of the next incremental export from this host.
    meta = volume.meta(snap.name)
    if not meta.get('exported'):
        _mark(volume, snap.name, time.time())
    try:
        digest, size = _write_stream(commands, path, timeout)
    except BackupError as e:
        if not meta.get('exported'):
            _mark(volume, snap.name, None)
        raise BackupError('export of %s failed, nothing kept: %s' % (
            snap.name, e))
    description = {
        'format': 'btrfs-send', 'compression': comp, 'volume': volume.path,
        'service': label, 'snapshot': snap.name,
        'parent': parent.name if parent else None,
        'created': meta.get('created'), 'token': snap.token,
        'host': meta.get('host'), 'exported': time.time(),
        'sha256': digest.hexdigest(), 'bytes': size, 'file': path,
        'seconds': time.monotonic() - started, 'note': note}
    return _describe(path, description, digest)


def _run_to_end(commands, deadline):
    """Run ``commands`` piped into each other, their output discarded,
    killed at ``deadline`` (monotonic; at least a second from now): what
    failed, in one line, or None."""
    procs, errs = _pipeline(commands, stdout=subprocess.DEVNULL)
    timer = _deadline(procs, max(1.0, deadline - time.monotonic()))
    for proc in procs:
        proc.wait()
    timer.cancel()
    return _failure(procs, errs, commands)


def _write_stream(commands, path, timeout):
    """Write the output of ``commands`` (piped) to ``path``, through
    ``path.part`` renamed once complete and synced; (its sha256 object,
    bytes). BackupError (what failed, nothing kept) after ``timeout``
    seconds or a failure."""
    part = path + '.part'
    started = time.monotonic()
    digest, size = hashlib.sha256(), 0
    procs, errs = _pipeline(commands)
    timer = _deadline(procs, timeout)
    failed = None
    try:
        with open(part, 'wb') as out:
            while True:
                data = procs[-1].stdout.read(CHUNK)
                if not data:
                    break
                out.write(data)
                digest.update(data)
                size += len(data)
            out.flush()
            os.fsync(out.fileno())
        for proc in procs:
            proc.wait()
        failed = _failure(procs, errs, commands)
    except OSError as e:
        failed = 'cannot write in %s: %s' % (os.path.dirname(part),
                                             e.strerror or e)
    finally:
        timer.cancel()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if failed is None and time.monotonic() - started >= timeout:
        failed = 'not done within %ds' % timeout
    if failed:
        _undo(part)
        raise BackupError(failed)
    os.rename(part, path)
    return digest, size


def _describe(path, description, digest):
    """FILE.sha256 (as sha256sum writes it) and FILE.json beside an
    export."""
    with open(path + '.sha256', 'w') as f:
        f.write('%s  %s\n' % (digest.hexdigest(), os.path.basename(path)))
    with open(path + '.json', 'w') as f:
        json.dump(description, f, indent=1, sort_keys=True)
    return description


def _mark(volume, name, when):
    meta = volume.meta(name)
    if not meta and when is None:
        return
    if when is None:
        meta.pop('exported', None)
    else:
        meta['exported'] = when
    try:
        volume._write_meta(name, meta)
    except (ReplicationError, OSError):
        pass  # the snapshot was deleted meanwhile: the send says so


def prune_exports(folder, volume, label, keep):
    """Delete the exports of service ``label`` in ``folder`` but the newest
    ``keep`` and those they need to be imported: an incremental export's
    parent, transitively. A file that cannot be deleted is left (the next
    prune tries again). Returns the paths deleted."""
    found = exports_in(folder, volume, label)
    kept = set(id(m) for m in found[-keep:]) if keep > 0 else set()
    # Exports by snapshot, newest last: the parent of an incremental one is
    # the newest export of its parent snapshot older than itself.
    wanted = [m for m in found if id(m) in kept]
    while wanted:
        meta = wanted.pop()
        parent = meta.get('parent')
        if not parent:
            continue
        for candidate in reversed(found[:found.index(meta)]):
            if candidate.get('snapshot') == parent:
                if id(candidate) not in kept:
                    kept.add(id(candidate))
                    wanted.append(candidate)
                break
    deleted = []
    # What an export killed with its host or service left (the next prune
    # runs after this host's own export ended, and only the owner exports).
    try:
        names = os.listdir(folder)
    except OSError:
        names = []
    for name in names:
        if name.startswith('%s-%s-' % (label, volume.name)) and \
                name.endswith('.part'):
            try:
                os.unlink(os.path.join(folder, name))
                deleted.append(os.path.join(folder, name))
            except OSError:
                pass
    for meta in found:
        if id(meta) in kept:
            continue
        for suffix in ('', '.sha256', '.json'):
            try:
                os.unlink(meta['file'] + suffix)
            except FileNotFoundError:
                pass
            except OSError:
                break
        else:
            deleted.append(meta['file'])
    return deleted


def _checksum(path, timeout):
    digest = hashlib.sha256()
    deadline = time.monotonic() + timeout
    with open(path, 'rb') as f:
        while True:
            data = f.read(CHUNK)
            if not data:
                return digest.hexdigest()
            digest.update(data)
            if time.monotonic() > deadline:
                raise BackupError('%s: checksum not done within %ds'
                                  % (path, timeout))


# The epoch of an imported snapshot: below every owner's (tokens are etcd
# revisions, 2 and up), so that what an owner writes after it is newer.
IMPORTED = 0


def _imported(volume, name):
    """The snapshot here that is snapshot ``name`` of an export: itself
    (received by replication), or what an import renamed it to."""
    snap = volume.get(name)
    if snap is not None:
        return snap
    for snap in volume.snapshots():
        if snap.token == IMPORTED and \
                volume.meta(snap.name).get('original') == name:
            return snap
    return None


def _checked(path, timeout, form):
    """(the description, the absolute path) of export ``path`` of format
    ``form``, once its checksum is right."""
    path = os.path.abspath(path)
    try:
        with open(path + '.json') as f:
            meta = json.load(f)
        with open(path + '.sha256') as f:
            expected = f.read().split()[0]
    except (OSError, ValueError, IndexError) as e:
        raise BackupError('%s: not an export of slaposha (its .json and'
                          ' .sha256 beside it are needed): %s' % (
                              path, getattr(e, 'strerror', None) or e))
    if not isinstance(meta, dict):
        meta = {}
    name = meta.get('snapshot')
    if meta.get('format') != form or \
            meta.get('compression') not in _COMPRESS or \
            not isinstance(name, str) or \
            (form == 'btrfs-send' and not NAME_RE.match(name)):
        raise BackupError('%s.json: not the description of %s' % (
            path, 'a btrfs export' if form == 'btrfs-send'
            else 'an rsync archive'))
    if not os.path.exists(path):
        raise BackupError('%s: no such file' % path)
    actual = _checksum(path, timeout)
    if actual != expected or actual != meta.get('sha256'):
        raise BackupError('%s: checksum mismatch (sha256 %s, expected %s):'
                          ' the file is damaged; nothing imported' % (
                              path, actual[:16], expected[:16]))
    return meta, path


def _receive_lock(store, path, what, where):
    """The lock a btrfs volume or an rsync tree holds while something comes
    in (a file descriptor to close); BackupError, naming ``path``, when
    another stream holds it or it cannot be taken."""
    try:
        lock = store._receiving()
    except (ReplicationError, OSError) as e:
        raise BackupError(str(e))
    if lock is None:
        raise BackupError('%s: %s is being received into %s; try again'
                          % (path, what, where))
    return lock


def import_export(volume, path, timeout=3600):
    """Check ``path`` against its .sha256 and receive it among the
    snapshots of ``volume`` on this host. Returns (its description, one
    line)."""
    started = time.monotonic()
    meta, path = _checked(path, timeout, 'btrfs-send')
    name, comp = meta['snapshot'], meta['compression']
    here = _imported(volume, name)
    if here is not None:
        return meta, 'snapshot %s is already here%s' % (
            name, ' as %s' % here.name if here.name != name else '')
    parent = meta.get('parent')
    local_parent = _imported(volume, parent) if parent else None
    if parent and local_parent is None:
        raise BackupError('%s is incremental after %s, which this host does'
                          ' not have: import that export first' % (
                              path, parent))
    lock = _receive_lock(volume, path, 'a stream', volume.snapdir)
    try:
        commands = [_COMPRESS[comp][1] + [path],
                    ['btrfs', 'receive', '-q', volume.snapdir]]
        failed = _run_to_end(commands, started + timeout)
        if failed is None and volume.get(name) is None:
            failed = 'btrfs receive did not finish %s' % name
        if failed:
            partial = os.path.join(volume.snapdir, name)
            if os.path.lexists(partial) and volume.get(name) is None:
                try:
                    volume._drop_partial(partial)
                except ReplicationError:
                    pass
            raise BackupError('import of %s failed, nothing kept: %s' % (
                path, failed))
        seq = int(NAME_RE.match(name).group(1))
        try:
            with volume._locked():
                while os.path.lexists(os.path.join(
                        volume.snapdir, snapshot_name(seq, IMPORTED))):
                    seq += 1
                final = snapshot_name(seq, IMPORTED)
                volume._write_meta(final, {
                    'created': meta.get('created'),
                    'token': meta.get('token'), 'host': meta.get('host'),
                    'original': name, 'parent': local_parent.name
                    if local_parent else None, 'imported': time.time(),
                    'from': path})
                os.rename(os.path.join(volume.snapdir, name),
                          os.path.join(volume.snapdir, final))
        except (ReplicationError, OSError) as e:
            # Under its own token it would outrank what owners write next.
            volume._drop_meta(snapshot_name(seq, IMPORTED))
            try:
                volume._delete_subvolume(os.path.join(volume.snapdir, name),
                                         'cannot delete %s' % name)
                kept = 'nothing kept'
            except ReplicationError as gone:
                kept = 'delete %s by hand: %s' % (name, gone)
            raise BackupError('import of %s failed, %s: cannot rename %s to'
                              ' %s: %s' % (path, kept, name,
                                           snapshot_name(seq, IMPORTED),
                                           getattr(e, 'strerror', None) or e))
    finally:
        os.close(lock)
    return meta, 'imported %s as %s (%s, taken %s UTC by %s, token %s)' \
        ' into %s in %.1f s' % (
            name, final, 'incremental after %s' % parent if parent
            else 'full', format_time(meta.get('created')), meta.get('host'),
            meta.get('token'), volume.snapdir, time.monotonic() - started)


# -- rsync trees: archives -----------------------------------------------------

# Owners, modes, ACLs and extended attributes as rsync -aHAX keeps them.
_TAR = ['tar', '--numeric-owner', '--acls', '--xattrs', '--xattrs-include=*']


def trees_of(service):
    """The rsync trees of a ServiceConfig."""
    from slaposha.replication.tree import Tree
    return [Tree(section.path, section.store)
            for section in service.resources if section.kind == 'rsync']


def export_tree(tree, to, label, timeout=3600):
    """Write the newest consistent copy of rsync tree ``tree`` on this host
    as a tar archive (zstd, or gzip) to ``to`` (a file, or a folder where
    it gets its own name), with its .sha256 and .json: where the service
    runs (or where only the folder is), a read-only btrfs snapshot of the
    folder when it is a subvolume, else the folder as it is (not
    crash-consistent, which the .json and the line say); on a standby, its
    newest complete copy, no transfer landing meanwhile. Returns the
    description."""
    import socket
    from slaposha.replication.tree import is_subvolume
    to = os.path.abspath(to)
    folder, path = (to, None) if os.path.isdir(to) else \
        (os.path.dirname(to), to)
    if not os.path.isdir(folder):
        raise BackupError('--to %s: no such folder' % folder)
    try:
        name, record = tree.newest()
        here = tree.active() is not None or record is None
    except (ReplicationError, OSError) as e:
        raise BackupError(str(e))
    lock = snapshot = None
    started = time.monotonic()
    try:
        if here:
            if not tree.exists():
                raise BackupError('%s: neither the folder nor a complete copy'
                                  ' of it on this host' % tree.path)
            info = {'created': time.time(), 'host':
                    socket.gethostname().split('.')[0],
                    'token': (tree.state()['live'] or {}).get('token')}
            source, mode = tree.path, 'live'
            if is_subvolume(tree.path):
                os.makedirs(tree.store, mode=0o700, exist_ok=True)
                snapshot = os.path.join(tree.store, 'export-%d-%s' % (
                    os.getpid(), os.urandom(3).hex()))
                p = subprocess.run(['btrfs', 'subvolume', 'snapshot', '-r',
                                    tree.path, snapshot],
                                   stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT,
                                   universal_newlines=True)
                if p.returncode:
                    snapshot = None
                    raise BackupError('%s: cannot take a snapshot: %s' % (
                        tree.path, p.stdout.strip()[-200:]))
                source, mode = snapshot, 'snapshot'
        else:
            lock = _receive_lock(tree, tree.path, 'a copy', tree.store)
            name, record = tree.newest()
            if record is None:
                raise BackupError('%s: no complete copy here' % tree.path)
            source, mode = tree.buffer(name), record.get('mode') or 'live'
            info = dict((k, record.get(k)) for k in ('created', 'host',
                                                     'token'))
        stamp = time.strftime('%Y%m%d-%H%M%S', time.gmtime(
            info['created'] or time.time()))
        copy = '%s-%s' % (stamp, info['token'] if info['token'] is not None
                          else 'x')
        comp = _compression()
        if path is None:
            path = os.path.join(folder, '%s-%s-%s.tar.%s' % (
                label, tree.name, copy, comp))
        elif not path.endswith('.tar.' + comp):
            raise BackupError('--to %s: the file name must end with .tar.%s'
                              % (path, comp))
        for p in (path, path + '.sha256', path + '.json'):
            if os.path.lexists(p):
                raise BackupError('--to %s: exists already; an export never'
                                  ' writes over anything' % p)
        try:
            digest, size = _write_stream(
                [_TAR + ['-C', source, '-cf', '-', '.'],
                 _COMPRESS[comp][0]], path, timeout)
        except BackupError as e:
            raise BackupError('export of %s failed, nothing kept: %s' % (
                tree.path, e))
    finally:
        if lock is not None:
            os.close(lock)
        if snapshot is not None:
            subprocess.run(['btrfs', 'subvolume', 'delete', snapshot],
                           stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    note = {'snapshot': 'full: a tar archive of a read-only snapshot of the'
            ' folder', 'stopped': 'full: a tar archive of a copy taken with'
            ' the applications stopped', 'live': 'full: a tar archive of the'
            ' live folder: not crash-consistent (a database written during'
            ' it can come out torn)'}.get(mode, 'full: a tar archive')
    if not here:
        note += ' (the copy on this standby)'
    return _describe(path, {
        'format': 'tar', 'compression': comp, 'volume': tree.path,
        'service': label, 'snapshot': copy, 'parent': None, 'mode': mode,
        'created': info['created'], 'token': info['token'],
        'host': info['host'], 'exported': time.time(),
        'sha256': digest.hexdigest(), 'bytes': size, 'file': path,
        'seconds': time.monotonic() - started, 'note': note}, digest)


def _import_staging(tree, path):
    """The store's folder an import lands in (the one that is not the
    complete copy), once it is sure the import may go there."""
    try:
        with tree._locked() as state:
            if alive(state['active']):
                raise BackupError('%s: the service runs on this host: an'
                                  ' import goes into the copies of a host'
                                  ' where it does not run' % path)
            complete, record = tree._newest(state)
            if record is not None and (record.get('token') or 0) > IMPORTED:
                raise BackupError(
                    '%s: this host has a copy of %s of token %s, newer than'
                    ' an import, which would replace it as the copy a'
                    ' takeover here uses: import on a host without one' % (
                        path, tree.path, record.get('token')))
            return tree._staging(state, complete)
    except (ReplicationError, OSError) as e:
        raise BackupError('%s: %s' % (path, getattr(e, 'strerror', None)
                                      or e))


def import_tree(tree, path, timeout=3600):
    """Check archive ``path`` against its .sha256 and unpack it into the
    store of rsync tree ``tree`` on this host as its newest complete copy,
    of token 0 (older than anything an owner sends: on a host whose folder
    is missing, the agent's start or a promote makes it the folder).
    Returns (its description, one line)."""
    from slaposha.replication.tree import syncfs
    started = time.monotonic()
    meta, path = _checked(path, timeout, 'tar')
    lock = _receive_lock(tree, path, 'a copy', tree.store)
    try:
        staging = _import_staging(tree, path)
        # What a cut transfer left there goes first: the archive is the
        # whole copy.
        for entry in os.listdir(staging):
            _undo(os.path.join(staging, entry))
        commands = [_COMPRESS[meta['compression']][1] + [path],
                    _TAR + ['-C', staging, '-xf', '-']]
        failed = _run_to_end(commands, started + timeout)
        if failed:
            for entry in os.listdir(staging):
                _undo(os.path.join(staging, entry))
            raise BackupError('import of %s failed, nothing kept: %s' % (
                path, failed))
        files = sum(len(names) for _, _, names in os.walk(staging))
        try:
            syncfs(staging)
            with tree._locked() as state:
                name = os.path.basename(staging)
                state['records'][name] = {
                    'token': IMPORTED, 'host': meta.get('host'),
                    'created': meta.get('created'), 'received': time.time(),
                    'bytes': meta.get('bytes'), 'files': files,
                    'mode': meta.get('mode'),
                    'original_token': meta.get('token'), 'imported': path}
                state['complete'] = name
        except (ReplicationError, OSError) as e:
            raise BackupError('import of %s failed: %s' % (path, e))
    finally:
        os.close(lock)
    return meta, 'imported %s (%s, taken %s UTC by %s, token %s) into %s as' \
        ' its newest copy, token %d, in %.1f s' % (
            path, meta.get('mode'), format_time(meta.get('created')),
            meta.get('host'), meta.get('token'), staging, IMPORTED,
            time.monotonic() - started)
