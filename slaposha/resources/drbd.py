"""``drbd``: a block device replicated synchronously by DRBD 9.

For hosts whose kernel has the drbd module (reference/replication.md 4b:
zero loss, every write acknowledged by the peers). Protocol C (a write
completes once on every connected peer's disk) and DRBD's own quorum, so
that a partitioned primary cannot go on writing alone; the owner is the
only Primary, the standbys stay Secondary and receive every write::

    [drbd#data]
    resource = slapgrid
    disk = /dev/vg0/slapgrid
    device = /dev/drbd0
    addresses = hA=10.0.0.1:7789 hB=10.0.0.2:7789
    witnesses = hW=10.0.0.3:7789
    [fs#slapgrid]
    device = /dev/drbd0
    mount_point = /srv/slapgrid

``witnesses``: diskless hosts that only vote, so that two hosts with data
keep a majority when one fails (three votes).

``on_no_quorum = io-error`` (the default): a primary that loses quorum
fails every write at once. The agent's fencing expects processes that can
be killed and a file system that can be unmounted; ``suspend-io`` would
freeze the applications in uninterruptible sleep with the mount held until
quorum comes back, so that neither a stop nor a fence could finish. The
lease is lost at about the same time anyway, and the service restarts
where the majority is.

Verbs: ``provision`` writes ``<config_dir>/<resource>.res`` from the
section, creates the metadata when the disk has none, and brings the
resource up (Secondary, so that this host receives); ``start`` = up if
needed, then Primary (DRBD refuses without quorum or an UpToDate disk:
that refusal is the safety); ``stop`` = Secondary; ``fence`` = a forced
demote started and not waited for; ``status`` parses ``drbdsetup status
--json``. Commands go through ``runner`` (:class:`Runner`), which the tests
replace: this machine has no drbd module.
"""

import json
import logging
import os
import subprocess
import threading

from slaposha.schema import REQUIRED, Key
from slaposha.replication import trim
from slaposha.resources import (
    DOWN, UP, WARN, Resource, ResourceError, Status, register)

__all__ = ['Drbd', 'Runner', 'resource_file']

logger = logging.getLogger(__name__)


class Runner(object):
    """Runs DRBD's commands: ``run(args, timeout)`` -> (exit code, stdout,
    stderr); ``spawn(args)`` starts one without waiting (a Popen)."""

    def run(self, args, timeout):
        try:
            p = subprocess.run(args, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL,
                               universal_newlines=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return 124, '', 'no answer within %gs' % timeout
        except OSError as e:
            return 127, '', 'cannot run %s: %s' % (args[0], e.strerror or e)
        return p.returncode, p.stdout, p.stderr

    def spawn(self, args):
        try:
            return subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL,
                                    stdin=subprocess.DEVNULL)
        except OSError:
            return None


def _host_addresses(raw):
    """``name=address:port`` words -> [(name, address, port)]."""
    hosts = []
    for word in raw:
        name, sep, where = word.partition('=')
        address, colon, port = where.rpartition(':')
        if not sep or not name or not colon or not port.isdigit():
            raise ValueError('expected name=address:port, got %r' % word)
        hosts.append((name, address.strip('[]'), int(port)))
    return hosts


def resource_file(section):
    """The text of the DRBD resource file for a validated section."""
    hosts = _host_addresses(section.addresses)
    witnesses = _host_addresses(section.witnesses)
    lines = [
        '# Written by slaposha (resource %s): edit the service file, not'
        ' this.' % section.rid,
        'resource %s {' % section.resource,
        '    net {',
        '        protocol C;',
        '        after-sb-0pri disconnect;',
        '        after-sb-1pri disconnect;',
        '        after-sb-2pri disconnect;',
        '    }',
        '    options {',
        '        quorum majority;',
        '        on-no-quorum %s;' % section.on_no_quorum,
        '    }',
    ]
    for node_id, (name, address, port) in enumerate(hosts + witnesses):
        diskless = node_id >= len(hosts)
        lines += [
            '    on %s {' % name,
            '        node-id %d;' % node_id,
            '        address %s:%d;' % (
                '[%s]' % address if ':' in address else address, port),
            '        volume 0 {',
            '            device %s minor %d;' % (section.device, section.minor),
            '            disk %s;' % ('none' if diskless else section.disk),
            '            meta-disk %s;' % ('internal' if diskless
                                           else section.meta_disk),
            '        }',
            '    }',
        ]
    lines += ['    connection-mesh {',
              '        hosts %s;' % ' '.join(h[0] for h in hosts + witnesses),
              '    }',
              '}']
    return '\n'.join(lines) + '\n'


@register
class Drbd(Resource):
    """a DRBD 9 device, protocol C with quorum: Primary on the owner only"""

    kind = 'drbd'
    keys = (
        Key('resource', 'name', REQUIRED, 'the DRBD resource name (its file'
            ' is <config_dir>/<resource>.res)'),
        Key('disk', 'path', REQUIRED, 'the backing block device, the same'
            ' path on every host with data'),
        Key('device', 'path', '/dev/drbd0', 'the replicated device the'
            ' service uses (e.g. in an fs resource)'),
        Key('minor', 'integer', 0, 'the device\'s minor number',
            minimum=0, maximum=1048575),
        Key('meta_disk', 'string', 'internal', 'where DRBD keeps its'
            ' metadata: internal (end of disk) or a device'),
        Key('addresses', 'words', REQUIRED, 'every host with data as'
            ' name=address:port (the names as uname -n says)'),
        Key('witnesses', 'words', [], 'diskless hosts that only vote for'
            ' quorum, as name=address:port'),
        Key('on_no_quorum', 'choice', 'io-error', 'what a primary that'
            ' lost quorum does with writes: io-error (fail at once, so that'
            ' the service can be stopped and fenced) or suspend-io',
            choices=['io-error', 'suspend-io']),
        Key('config_dir', 'path', '/etc/drbd.d', 'where the resource file'
            ' is written'),
        Key('timeout', 'duration', 30.0, 'longest wait for one drbdadm'
            ' command', minimum=1.0),
    )

    @classmethod
    def validate(cls, section):
        for key in ('addresses', 'witnesses'):
            try:
                hosts = _host_addresses(getattr(section, key))
            except ValueError as e:
                return '%s: %s' % (key, e)
            if key == 'addresses' and not hosts:
                return 'addresses: at least one host with data is needed'
        names = [h[0] for h in _host_addresses(section.addresses) +
                 _host_addresses(section.witnesses)]
        if len(set(names)) != len(names):
            return 'addresses: a host is listed twice (with witnesses)'
        return None

    def __init__(self, section, context):
        super().__init__(section, context)
        self.runner = Runner()
        self.name = section.resource
        self.path = os.path.join(section.config_dir, section.resource + '.res')

    # -- commands -------------------------------------------------------------

    def _run(self, *args):
        return self.runner.run(list(args), self.conf.timeout)

    def _must(self, what, *args):
        code, out, err = self._run(*args)
        if code:
            raise ResourceError('%s: %s failed: %s' % (
                self.rid, what, trim(err or out) or 'exit %d' % code))
        return out

    def _state(self):
        """The resource's entry of ``drbdsetup status --json``, or None
        when it is not up here."""
        code, out, err = self._run('drbdsetup', 'status', '--json', self.name)
        if code:
            return None
        try:
            found = json.loads(out)
        except ValueError:
            raise ResourceError('%s: drbdsetup status: not JSON: %s' % (
                self.rid, trim(out, 80)))
        for entry in found if isinstance(found, list) else [found]:
            if isinstance(entry, dict) and entry.get('name') == self.name:
                return entry
        return None

    # -- verbs ----------------------------------------------------------------

    def provision(self):
        """Write the resource file; create the metadata when the disk has
        none; bring the resource up (Secondary)."""
        text = resource_file(self.conf)
        try:
            os.makedirs(self.conf.config_dir, exist_ok=True)
            with open(self.path + '.tmp', 'w') as f:
                f.write(text)
            os.rename(self.path + '.tmp', self.path)
        except OSError as e:
            raise ResourceError('%s: cannot write %s: %s' % (
                self.rid, self.path, e.strerror or e))
        if self._state() is not None:
            self._must('adjust', 'drbdadm', 'adjust', self.name)
            return
        code, _, _ = self._run('drbdadm', 'dump-md', self.name)
        if code:
            self._must('create-md', 'drbdadm', 'create-md', '--force',
                       self.name)
        self._must('up', 'drbdadm', 'up', self.name)

    def start(self):
        state = self._state()
        if state is None:
            self._must('up', 'drbdadm', 'up', self.name)
            state = self._state() or {}
        if state.get('role') != 'Primary':
            self._must('promote', 'drbdadm', 'primary', self.name)

    def stop(self):
        state = self._state()
        if state is not None and state.get('role') == 'Primary':
            self._must('demote', 'drbdadm', 'secondary', self.name)

    def fence(self):
        """Demote now, by force (open handles get I/O errors), without
        waiting: the lease is gone, and with quorum lost the device already
        refuses writes. The command is reaped in the background."""
        proc = self.runner.spawn(['drbdsetup', 'secondary', '--force',
                                  self.name])
        if proc is not None:
            threading.Thread(target=proc.wait, daemon=True).start()

    def fence_targets(self):
        return [], []

    def status(self):
        try:
            state = self._state()
        except ResourceError as e:
            return Status(WARN, str(e))
        if state is None:
            return Status(DOWN, 'resource %s is not up here' % self.name)
        return describe(state)


def describe(state):
    """A Status from one resource of ``drbdsetup status --json``: up when
    Primary with an UpToDate disk, quorum and every peer in sync; warn when
    Primary otherwise; down when Secondary."""
    role = state.get('role', '?')
    devices = state.get('devices') or [{}]
    disk = devices[0].get('disk-state', '?')
    quorum = all(d.get('quorum', True) for d in devices)
    parts = ['%s, disk %s%s' % (role, disk, '' if quorum else ', NO QUORUM')]
    if state.get('suspended'):
        parts.append('I/O suspended')
    healthy = disk == 'UpToDate' and quorum and not state.get('suspended')
    for conn in state.get('connections') or []:
        name = conn.get('name') or 'node %s' % conn.get('peer-node-id')
        link = conn.get('connection-state', '?')
        peer_devices = conn.get('peer_devices') or [{}]
        pd = peer_devices[0]
        text = '%s: %s' % (name, link)
        if link == 'Connected':
            text += ', %s, peer disk %s' % (pd.get('replication-state', '?'),
                                            pd.get('peer-disk-state', '?'))
            done = pd.get('percent-in-sync')
            if done is not None and done < 100:
                text += ', %.1f%% in sync' % done
            if pd.get('peer-disk-state') not in ('UpToDate', 'Diskless'):
                healthy = False
        else:
            healthy = False
        parts.append(text)
    if role != 'Primary':
        return Status(DOWN, '; '.join(parts))
    return Status(UP if healthy else WARN, '; '.join(parts))
