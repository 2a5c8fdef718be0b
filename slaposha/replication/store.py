"""What both engines keep on a host of the data they protect, in one place.

A btrfs volume (:class:`slaposha.replication.volume.Volume`) and an rsync
tree (:class:`slaposha.replication.tree.Tree`) differ in how their copies
are made and kept, not in what a host must remember of them. Each is a
:class:`Store`, with a state file of its own (locked against the host's
other processes and threads, :func:`slaposha.replication.locked_state`)
that holds:

- the newest token seen: the epoch of the newest owner this host heard of.
  A copy of an older epoch is refused (a deposed owner never overwrites the
  new owner's data), and an owner of an older epoch may not start here;
- the active marker: the service runs here, as the owner of a token, in a
  process of this boot (its pid, its start time, the boot id). A marker
  left by a process that died, or by a boot before this one, does not
  count (:func:`alive`). Nothing is received into data in use;
- the diverged list: the data kept aside because a new owner's copy
  replaced it while it held writes that copy does not have (a Store is a
  :class:`slaposha.replication.diverged.DivergedCopies`: recorded, listed
  with ids and sizes, bounded, dropped).

A receive lock beside the state file lets one transfer land at a time.
"""

import errno
import fcntl
import os

from slaposha.proc import boot_id, start_time
from slaposha.replication import ReplicationError, StaleToken, locked_state
from slaposha.replication.diverged import DivergedCopies

__all__ = ['Store', 'alive']


def alive(active):
    """Whether an active marker is of a process that runs now (same boot,
    same process start time)."""
    return bool(active) and active.get('boot') == boot_id() and \
        start_time(active.get('pid', -1)) == active.get('start')


class Store(DivergedCopies):
    """The state a host keeps of one volume or tree at ``self.path``.

    An engine provides ``home()`` (the folder of the state file and the
    receive lock), ``_defaults()`` (the state when there is none yet, with
    at least ``token``, ``active`` and ``diverged``), ``STATE_FILE`` (the
    state file's name in ``home()``), ``MODE`` (of the folders made for
    it) and ``_remove_copy(path, wait)`` for the diverged copies."""

    STATE_FILE = 'state.json'
    MODE = 0o777

    def __str__(self):
        return self.path

    def error(self, message, peer=None, incoming=False):
        return ReplicationError(self.path, message, peer, incoming)

    # -- state ----------------------------------------------------------------

    def _locked(self):
        """The state, locked against the other processes and threads of
        the host (a receiver and the agent); written back (atomically) if
        changed."""
        return locked_state(os.path.join(self.home(), self.STATE_FILE),
                            self._defaults, self.error, mode=self.MODE)

    def state(self):
        with self._locked() as state:
            return dict(state)

    def _receiving(self):
        """A lock held while a transfer lands (a file descriptor to close),
        or None when another transfer holds it."""
        os.makedirs(self.home(), mode=self.MODE, exist_ok=True)
        fd = os.open(os.path.join(self.home(), '.receiving'),
                     os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return None
            raise
        return fd

    # -- the newest token seen --------------------------------------------------

    def _check_token(self, state, token, peer=None, incoming=False):
        """StaleToken when a token newer than ``token`` was seen here."""
        if token < state['token']:
            raise StaleToken(self.path, 'token %d is stale: token %d was'
                             ' seen here' % (token, state['token']), peer,
                             incoming)

    def _may_receive(self, state, token, sender):
        """A transfer of epoch ``token`` from ``sender`` may land here:
        StaleToken when a newer epoch was seen, ReplicationError when the
        service runs here (it receives nothing)."""
        self._check_token(state, token, sender, True)
        if alive(state['active']):
            raise self.error('the service runs on this host (token %d):'
                             ' it receives nothing'
                             % state['active']['token'], sender, True)

    def _take_token(self, state, token):
        """The owner of epoch ``token`` starts the service here: StaleToken
        if a newer owner sent data here, else its token is the newest."""
        if token < state['token']:
            raise StaleToken(self.path, 'token %d is stale: a newer owner'
                             ' (token %d) sent data here' % (
                                 token, state['token']))
        state['token'] = token

    # -- where the service runs -----------------------------------------------

    @staticmethod
    def _mark_active(state, token):
        pid = os.getpid()
        state['active'] = {'pid': pid, 'start': start_time(pid),
                           'boot': boot_id(), 'token': token}

    @staticmethod
    def _active_token(state):
        return state['active']['token'] if alive(state['active']) else None

    def active(self):
        """The token of the owner running the service here, or None. A
        marker left by a process that died (a crash) does not count."""
        return self._active_token(self.state())
