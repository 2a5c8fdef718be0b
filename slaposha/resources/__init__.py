"""Resources: the parts of a service, one driver module per kind.

Every driver has the same verbs (OpenSVC's taxonomy): ``start``, ``stop``,
``status`` and optionally ``provision``, plus ``fence``: the fast, blocking-
free kill that self-fencing uses at the lease deadline. A driver declares its
configuration keys with :func:`slaposha.config.register_resource_kind`, so
that service files are validated in one place.
"""

import importlib
import subprocess
from collections import namedtuple

from slaposha import config

__all__ = ['Resource', 'ResourceError', 'Status', 'UP', 'DOWN', 'WARN', 'NA',
           'driver', 'DRIVERS', 'copy_folder']

UP, DOWN, WARN, NA = 'up', 'down', 'warn', 'n/a'



class Status(namedtuple('Status', 'state message')):
    """A resource's state (UP, DOWN, WARN, NA) and one line saying why;
    ``details``: more lines for the status tree (e.g. one per partition of
    a SlapOS node), not part of the tuple."""

    def __new__(cls, state, message, details=()):
        self = super().__new__(cls, state, message)
        self.details = list(details)
        return self


class ResourceError(Exception):
    """A resource failed to start or stop, as one line saying why."""


def copy_folder(src, dst, delete, live=False):
    """Copy folder ``src`` into ``dst`` on this host, numeric owners,
    modes, ACLs, xattrs and times kept (what moves with a node: its
    identity, re6st's files); ``delete``: also remove what ``src`` lacks.
    ``live``: a program may be writing in ``src`` (re6st's state): a file
    that vanishes during the copy is no error, and SQLite's journal, WAL
    and shared-memory files are left out (the caller copies the databases
    with SQLite's backup; a stale WAL beside that copy could be replayed
    onto it)."""
    # Nanosecond mtimes: rsync's whole seconds would skip a file rewritten
    # with the same size within the second.
    args = ['rsync', '-aHAX', '--numeric-ids', '--modify-window=-1']
    if delete:
        args.append('--delete')
    if live:
        args += ['--exclude=*-journal', '--exclude=*-wal', '--exclude=*-shm']
        if delete:
            args.append('--delete-excluded')
    p = subprocess.run(args + [src.rstrip('/') + '/', dst.rstrip('/') + '/'],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True, timeout=120)
    # 24: "some files vanished before they could be transferred".
    if p.returncode and not (live and p.returncode == 24):
        raise ResourceError('rsync %s to %s: %s' % (
            src, dst, p.stderr.strip()[-300:]))


# kind -> module; a kind's module registers its keys when imported.
DRIVERS = {
    'ip': 'slaposha.resources.ip',
    'fs': 'slaposha.resources.fs',
    'app': 'slaposha.resources.app',
    'task': 'slaposha.resources.task',
    'export': 'slaposha.resources.export',
    'btrfs': 'slaposha.resources.btrfs',
    'rsync': 'slaposha.resources.rsync',
    'drbd': 'slaposha.resources.drbd',
    'slapos': 'slaposha.resources.slapos',
    're6st': 'slaposha.resources.re6st',
}

_CLASSES = {}


def register(cls):
    """Class decorator of a driver: declares its kind and its keys."""
    config.register_resource_kind(cls.kind, cls.keys, cls.__doc__.split(
        '\n')[0] if cls.__doc__ else '')
    _CLASSES[cls.kind] = cls
    return cls


def load_drivers():
    """Import every driver, so that service files can name their kinds."""
    for module in DRIVERS.values():
        try:
            importlib.import_module(module)
        except ImportError as e:
            if e.name != module:  # a driver not written yet is skipped
                raise


def check_section(section):
    """What its driver finds wrong with a resource section, or None."""
    cls = _CLASSES.get(section.kind)
    return cls.validate(section) if cls is not None else None


def driver(kind):
    load_drivers()
    return _CLASSES[kind]


class Resource(object):
    """Base of the drivers. ``section`` is the validated config section
    (``rid``, ``kind`` and the driver's keys); ``context`` gives what the
    service provides: its name, its cgroup, where logs go."""

    kind = None
    keys = ()

    def __init__(self, section, context):
        self.conf = section
        self.rid = section.rid
        self.context = context

    def __repr__(self):
        return '<%s %s>' % (type(self).__name__, self.rid)

    @property
    def cgroup(self):
        """A cgroup of this resource's own, below the service's."""
        return self.context.cgroup.child(self.rid.replace('#', '.'))

    @classmethod
    def validate(cls, section):
        """What is wrong with a section beyond each key's own check, as one
        line; None when it is right."""
        return None

    def start(self):
        raise NotImplementedError

    def stop(self):
        raise NotImplementedError

    def status(self):
        raise NotImplementedError

    def provision(self):
        """Prepare what start needs (optional)."""

    def fence(self):
        """Stop at once, without waiting for anything: the lease is gone."""
        self.cgroup.kill()

    # Drivers whose standbys must match the owner (same paths, same uids)
    # define both: publish() on the owner, problems() on each standby.
    publish = None

    def problems(self, published):
        """Lines saying why this host cannot take over, given what the
        owner published; [] when it can."""
        return []

    # Drivers whose owner works from what each standby has (e.g. the
    # software releases it still lacks) define both: report() on each
    # standby (JSON-able, announced with its host's health), reported() on
    # the owner, every agent cycle, with {host: report or None}.
    report = None

    def reported(self, reports):
        """What each standby last reported (None: no report: not alive)."""

    def fence_targets(self):
        """(cgroups, addresses) that the watchdog kills and drops for this
        resource if the agent cannot."""
        return [self.cgroup.path], []
