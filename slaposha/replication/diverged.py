"""Diverged copies: the data a host kept aside because a new owner's copy
replaced it while it held writes that copy does not have (an old owner
that wrote after its last copy was sent, then lost the service).

Both engines (:mod:`.volume`, :mod:`.tree`) keep them the same way: set
aside, never deleted by a takeover, each recorded in the engine's state as
``{path, at, reason, token}``. This module gives them what operators need
on top: an id (the name it was kept under), the size it holds, a retention
that bounds them (``diverged_keep`` copies, ``diverged_max_age`` seconds,
never the newest) and a drop by id. An engine's
:class:`~slaposha.replication.store.Store` is a :class:`DivergedCopies`
and provides ``_locked()`` (its state, locked) and ``_remove_copy(path,
wait)`` (``wait``: done when it returns, else it may finish in the
background).
"""

import os
import time

from slaposha.replication import ReplicationError

__all__ = ['DivergedCopies', 'copy_id', 'disk_usage', 'to_drop']


def copy_id(path):
    """The id an operator names a copy by: the name it was kept under."""
    name = os.path.basename(path.rstrip('/'))
    return name[len('diverged-'):] if name.startswith('diverged-') else name


def disk_usage(path):
    """Bytes the files below ``path`` take on disk (each hard link once,
    symbolic links not followed); what cannot be read counts as 0."""
    total, seen = 0, set()
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                st = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if st.st_nlink > 1:
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def to_drop(entries, keep=None, max_age=None, now=None):
    """The entries that retention removes: beyond the newest ``keep``, and
    older than ``max_age`` seconds; never the newest one."""
    now = time.time() if now is None else now
    ordered = sorted(entries, key=lambda d: d.get('at') or 0, reverse=True)
    drop = []
    for n, entry in enumerate(ordered[1:], 1):
        if keep is not None and n >= keep:
            drop.append(entry)
        elif max_age is not None and now - (entry.get('at') or 0) > max_age:
            drop.append(entry)
    return drop


class DivergedCopies(object):
    """What an engine's volume or tree offers on its diverged copies."""

    @staticmethod
    def _record_diverged(state, path, reason, token):
        """``path`` now holds data kept aside (``reason``; ``token``: the
        epoch that wrote it, when known)."""
        state['diverged'].append({'path': path, 'at': time.time(),
                                  'reason': reason, 'token': token})

    @staticmethod
    def _present_diverged(state):
        """The entries whose copy is still there (one removed by hand is
        not)."""
        return [d for d in state['diverged'] if os.path.lexists(d['path'])]

    def diverged(self):
        """The copies kept aside and still there, oldest first: [{id,
        path, at, reason, token, size}] (size in bytes, measured once)."""
        with self._locked() as state:
            present = self._present_diverged(state)
            if len(present) != len(state['diverged']):
                state['diverged'] = present  # removed by hand: forgotten
            for entry in present:
                if entry.get('size') is None:
                    entry['size'] = disk_usage(entry['path'])
            found = [dict(d, id=copy_id(d['path'])) for d in present]
        return sorted(found, key=lambda d: d.get('at') or 0)

    def drop_diverged(self, wanted):
        """Delete the diverged copy whose id is ``wanted``; returns its
        entry. ReplicationError (one line, with the ids there are) when
        there is none such."""
        with self._locked() as state:
            for entry in state['diverged']:
                if copy_id(entry['path']) == wanted and \
                        os.path.lexists(entry['path']):
                    self._remove_copy(entry['path'], wait=True)
                    state['diverged'] = [d for d in state['diverged']
                                         if d is not entry]
                    return dict(entry, id=wanted)
            ids = [copy_id(d['path'])
                   for d in self._present_diverged(state)]
        raise ReplicationError(self.path, 'no diverged copy %s here (%s)' % (
            wanted, 'there are: %s' % ', '.join(ids) if ids else
            'there is none'))

    def retain_diverged(self, keep=None, max_age=None):
        """Apply the retention: delete the copies beyond the newest
        ``keep`` and those older than ``max_age`` seconds, never the newest.
        Returns the ids deleted."""
        if keep is None and max_age is None:
            return []
        dropped = []
        with self._locked() as state:
            present = self._present_diverged(state)
            for entry in to_drop(present, keep, max_age):
                self._remove_copy(entry['path'])
                state['diverged'] = [d for d in state['diverged']
                                     if d is not entry]
                dropped.append(copy_id(entry['path']))
        return dropped
