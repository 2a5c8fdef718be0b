"""``slaposha slapos adopt``: a running SlapOS node put under the
cluster's care (``release``, :mod:`slaposha.slapos.release`, gives it
back).

:class:`Adoption` reads the node as it is, on its host: slapos.cfg, the
partitions and their addresses (each ``.slapos-resource``), the cron
entries that run slapgrid, re6st, where instance_root lives. Its
:meth:`~Adoption.plan` says what moves with the node, what each peer must
have and what changes on this host; :meth:`~Adoption.apply` does it, one
idempotent step after the other, so that a run cut short is run again:

1. ``state``: what the other steps change is written first into
   ``<identity>/slaposha-adopt.json`` (the cron files, slapos.cfg's
   ``input_definition_file``), which moves with the node: ``release``
   undoes it from there, on whichever host runs the node then;
2. ``cron``: the entries that run `slapos node ...` are disabled, kept in
   their file (:mod:`slaposha.slapos.cron`): only the owner may run
   slapgrid, as tasks of the service; ``re6st_unit``: where the node has
   re6st, the host's own ``re6stnet.service`` is stopped and disabled
   (:mod:`slaposha.slapos.systemd`: the agent runs the node's daemon
   where the node runs) and its state before recorded;
3. ``data``: instance_root must be a btrfs subvolume below a btrfs file
   system root (the ``btrfs`` driver replicates it). A folder on btrfs is
   moved into a new subvolume at the same path with ``--convert``, the
   node's programs stopped (a copy with reflinks, then two renames; the
   old folder is kept); anything else is said, with the commands to get
   there;
4. ``definition``: ``slapos node format`` keeps today's addresses wherever
   it runs: the definition file (as format's own ``output_definition_file``
   writes it) is made from the partitions' ``.slapos-resource`` and
   slapos.cfg's ``[slapformat] input_definition_file`` points to it (one
   line changed, the rest of the file as it was);
5. ``identity`` and ``parameters``: saved into the data at once (the
   owner refreshes them afterwards), so a takeover right after finds them;
6. ``service``: the service file, from the node's own settings: the data,
   re6st if the node has it, the node, and its cron entries as tasks.
   A service file already there is kept as it is.
"""

import configparser
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xmlrpc.client

from slaposha.schema import NAME_RE
from slaposha.slapos import cron, identity
from slaposha.slapos.files import read_ini, set_key, write_atomic
from slaposha.slapos.node import NodeError, load_node
from slaposha.slapos.systemd import OFF, RE6ST_UNIT, UnitError, Units
from slaposha.units import human_bytes

__all__ = ['Adoption', 'AdoptError', 'STATE', 'DEFINITION', 'EXCLUSIVE',
           'read_state', 'write_state', 'slapos_command', 'slapos_version',
           'data_state', 'supervisord_pid', 'processes_in', 'kept_entries']

STATE = 'slaposha-adopt.json'
DEFINITION = 'slaposha-definition.cfg'
# The exclusive name of every SlapOS node service: their paths collide.
EXCLUSIVE = 'slapos-node'
SUBVOLUME_INODE = 256


class AdoptError(Exception):
    """What keeps adopt or release from going on, as one line (or a few,
    when they say how to get there)."""


def _now():
    return time.strftime('%Y-%m-%d %H:%M:%S')


def read_state(folder):
    """The adoption record kept in the identity folder, or None."""
    try:
        with open(os.path.join(folder, STATE)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise AdoptError('%s: unreadable: %s' % (os.path.join(folder, STATE),
                                                   e))


def write_state(folder, state):
    write_atomic(os.path.join(folder, STATE),
                  json.dumps(state, indent=1, sort_keys=True) + '\n', 0o600)


def data_state(path):
    """('subvolume' | 'folder' | 'elsewhere', detail): whether ``path`` is a
    btrfs subvolume below its file system's root ('subvolume'), a folder
    that can become one where it is ('folder', the file system's mount
    point), or neither (why)."""
    from slaposha.replication import ReplicationError
    from slaposha.replication.volume import Volume
    try:
        root = Volume(path).root
    except ReplicationError as e:
        return 'elsewhere', str(e).split(': ', 1)[-1]
    try:
        subvolume = os.lstat(path).st_ino == SUBVOLUME_INODE
    except OSError:
        return 'elsewhere', 'missing'
    return ('subvolume' if subvolume else 'folder'), root


def slapos_command(entries):
    """The node's own `slapos` program: the one its cron entries run, else
    /opt/slapos/bin/slapos, else `slapos` on PATH."""
    for entry in entries:
        first = entry.command.split()[0]
        if os.path.basename(first) == 'slapos':
            return first
    if os.path.exists('/opt/slapos/bin/slapos'):
        return '/opt/slapos/bin/slapos'
    return shutil.which('slapos') or 'slapos'


def slapos_version(command):
    """slapos.core's version in the install of ``command``, or None."""
    top = os.path.dirname(os.path.dirname(os.path.realpath(command)))
    for pattern in ('lib/python*/site-packages/slapos[._]core-*.dist-info',
                    'lib/python*/site-packages/slapos[._]core-*.egg-info',
                    'eggs/slapos[._]core-*.egg'):
        for path in sorted(glob.glob(os.path.join(top, pattern))):
            m = re.match(r'slapos[._]core-([^-]+?)(\.dist-info|\.egg-info|'
                         r'-py.*|\.egg)$', os.path.basename(path))
            if m:
                return m.group(1)
    return None


def kept_entries(state):
    """The cron entries that adopt recorded (for a host that has not
    them: the node moved there)."""
    return [cron.Entry(None, 0, timing, user, command, True)
            for timing, user, command in (state or {}).get('entries', [])]


def _definition(node):
    """The text of a format definition file that pins every partition as
    .slapos-resource says it is (format's write_computer_definition)."""
    lines = ['# Written by `slaposha slapos adopt` from each partition\'s'
             ' .slapos-resource:',
             '# `slapos node format` keeps these addresses wherever the node'
             ' runs.', '[computer]', 'software_user = %s' % node.software_user]
    for n, part in enumerate(node.partitions()):
        res = part.resource
        addresses = ['%s/%s' % (a['addr'], a['netmask']) for a in
                     res.get('address_list') or [] if a.get('addr')]
        tap = res.get('tap') or {}
        lines += ['', '[partition_%d]' % n,
                  'address = %s' % ' '.join(addresses),
                  'user = %s' % part.user,
                  'pathname = %s' % part.id,
                  'network_interface = %s' % (
                      tap.get('name') if isinstance(tap, dict) and
                      tap.get('name') else node.interface)]
        rng = res.get('ipv6_range') or {}
        if isinstance(rng, dict) and rng.get('network'):
            lines.append('ipv6_range = %s' % rng['network'])
    return '\n'.join(lines) + '\n'


def _pinned(path):
    """{pathname: sorted addresses} of a definition file, or None."""
    try:
        config = read_ini(path)
    except (OSError, configparser.Error):
        return None
    found = {}
    for section in config.sections():
        if section.startswith('partition_'):
            found[config[section].get('pathname')] = sorted(
                config[section].get('address', '').split())
    return found


def supervisord_pid(node):
    """The pid of the node's instance supervisord, when it answers."""
    from slaposha.slapos.supervisor import rpc
    try:
        return rpc(node.supervisord_socket, 2.0).supervisor.getPID()
    except (OSError, xmlrpc.client.Error):
        return None


def processes_in(root, limit=3):
    """[(pid, name)] of processes that use something under ``root`` (their
    working folder, program or an open file), at most ``limit``: a node's
    supervisord that is still shutting down answers no RPC but still writes
    its log and removes its socket, and a partition's program started
    outside supervisord is as live."""
    root = os.path.realpath(root).rstrip('/') + '/'
    found = []
    for pid in sorted(int(n) for n in os.listdir('/proc') if n.isdigit()):
        if pid == os.getpid():
            continue
        base = '/proc/%d/' % pid
        try:
            links = [base + 'cwd', base + 'exe'] + \
                [base + 'fd/' + fd for fd in os.listdir(base + 'fd')]
        except OSError:
            continue  # gone, or a kernel thread
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if (target + '/').startswith(root):
                try:
                    with open(base + 'comm') as f:
                        name = f.read().strip()
                except OSError:
                    name = '?'
                found.append((pid, name))
                break
        if len(found) >= limit:
            break
    return found


def _slapgrid_running(config):
    """The slapgrid runs going on (their pid files)."""
    slapos = config['slapos'] if config.has_section('slapos') else {}
    found = []
    for key, default in (('pidfile_software', '/opt/slapos/slapgrid-sr.pid'),
                         ('pidfile_instance', '/opt/slapos/slapgrid-cp.pid'),
                         ('pidfile_report', '/opt/slapos/slapgrid-ur.pid')):
        path = slapos.get(key, default)
        try:
            with open(path) as f:
                pid = int(f.read().strip())
            os.kill(pid, 0)
            found.append('%s (pid %d)' % (key, pid))
        except (OSError, ValueError):
            continue
    return found


def _du(path, timeout=30):
    """Bytes under ``path``, or None when unknown (too many files to count
    within ``timeout``: the plan says so rather than wait)."""
    try:
        p = subprocess.run(['du', '-sb', path], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, universal_newlines=True,
                           timeout=timeout)
        return int(p.stdout.split()[0])
    except (subprocess.TimeoutExpired, IndexError, ValueError):
        return None


class Step(object):
    """One step of the adoption: its name, whether it is done, what it
    does (or did), and what keeps it from being done, if anything."""

    def __init__(self, name, done, text, blocker=None):
        self.name = name
        self.done = done
        self.text = text
        self.blocker = blocker


class Adoption(object):
    """The node of ``cfg`` on this host (``host`` of ``cluster``), to become
    the service ``name`` on ``hosts``."""

    def __init__(self, cfg, cluster, host, name=None, hosts=None,
                 cron_dir=cron.CRON_DIR, crontab=cron.CRONTAB,
                 re6st_config='/etc/re6stnet', units=None):
        try:
            self.node = load_node(cfg)
        except NodeError as e:
            raise AdoptError(str(e))
        self.cfg = self.node.config_path
        self.config = read_ini(self.cfg)
        self.cluster = cluster
        self.host = host
        if host not in cluster.cluster.hosts:
            raise AdoptError('%s: this host is %r (--host, or the hostname),'
                             ' not one of [cluster] hosts (%s)' % (
                                 cluster.path, host,
                                 ' '.join(cluster.cluster.hosts)))
        self.name = name or re.sub(r'[^a-z0-9_.-]', '-',
                                   self.node.computer_id.lower())
        if not NAME_RE.match(self.name):
            raise AdoptError('--service: %r is not a service name (letters,'
                             ' digits, "-", "_" or ".")' % self.name)
        self.hosts = list(hosts) if hosts else [host] + [
            h for h in cluster.cluster.hosts if h != host]
        for h in self.hosts:
            if h not in cluster.cluster.hosts:
                raise AdoptError('--hosts: %r is not one of [cluster] hosts'
                                 ' (%s)' % (h, ' '.join(
                                     cluster.cluster.hosts)))
        if host not in self.hosts:
            raise AdoptError('--hosts: this host (%s) must be one of them'
                             % host)
        self.identity = os.path.dirname(self.cfg)
        self.service_file = os.path.join(cluster.services_dir,
                                         self.name + '.cfg')
        self.cron_dir, self.crontab = cron_dir, crontab
        self.entries = cron.entries(cron_dir, crontab)
        self.re6st = re6st_config if os.path.exists(
            os.path.join(re6st_config, 're6stnet.conf')) else None
        self.units = units or Units()
        self.partitions = self.node.partitions()
        self.state = read_state(self.identity)
        self.slapos = slapos_command(self.entries or kept_entries(self.state))

    # -- what is there ---------------------------------------------------------

    def _format_key(self):
        fmt = self.config['slapformat'] if self.config.has_section(
            'slapformat') else {}
        return fmt.get('input_definition_file') or None

    def _definition_path(self):
        return os.path.join(self.identity, DEFINITION)

    def _definition_done(self):
        current = self._format_key()
        today = {p.id: sorted('%s/%s' % (a['addr'], a['netmask']) for a in
                              p.resource.get('address_list') or []
                              if a.get('addr'))
                 for p in self.partitions}
        return current is not None and _pinned(current) == today

    def _tasks(self):
        """[(name, command, seconds)] from the node's cron entries."""
        tasks, names = [], set()
        for entry in self.entries or kept_entries(self.state):
            seconds = cron.every(entry.timing)
            if seconds is None:
                continue  # @reboot: never under the agent
            m = re.search(r'\bslapos\s+node\s+([a-z-]+)', entry.command)
            base = m.group(1) if m else 'slapos'
            name, n = base, 2
            while name in names:
                name, n = '%s-%d' % (base, n), n + 1
            names.add(name)
            tasks.append((name, entry.command, seconds))
        return tasks

    def service_text(self):
        """The service file, from the node's own settings."""
        def duration(seconds):
            for unit, size in (('h', 3600), ('m', 60)):
                if seconds % size == 0:
                    return '%d%s' % (seconds // size, unit)
            return '%ds' % seconds
        slaposha = os.path.join(os.path.dirname(sys.executable), 'slaposha')
        if not os.path.exists(slaposha):
            slaposha = 'slaposha'
        lines = [
            '# The SlapOS node %s (%s) as a service of the cluster: written'
            % (self.node.computer_id, self.cfg),
            '# by `slaposha slapos adopt` on %s, %s. Yours to edit: adopt'
            ' keeps it as it is.' % (self.host, _now()),
            '[service]',
            'hosts = %s' % ' '.join(self.hosts),
            '# SlapOS nodes share their paths: never two on one host',
            'exclusive = %s' % EXCLUSIVE,
            '',
            '# instance_root, sent to the standbys as btrfs snapshots',
            '[btrfs#slapgrid]',
            'volume = %s' % self.node.instance_root,
            '']
        if self.re6st:
            lines += ['# the node\'s re6st identity and state, moved with it',
                      '[re6st#mesh]', 'config = %s' % self.re6st,
                      'cfg = %s' % self.cfg, '']
        lines += ['# the partitions\' addresses, the instance supervisord and'
                  ' the programs', '[slapos#node]', 'cfg = %s' % self.cfg,
                  'identity = %s' % self.identity, '']
        origin = sorted({e.path for e in self.entries}) or ['the cron entries'
                                                           ' kept at adopt']
        for name, command, seconds in self._tasks():
            lines += ['# from %s: only where the node runs' % ', '.join(
                origin), '[task#%s]' % name, 'command = %s' % command,
                'schedule = %s' % duration(seconds), '']
        lines += ['# the instance parameters, kept in the data',
                  '[task#parameters]',
                  'command = %s slapos save-parameters --slapos-cfg %s'
                  % (slaposha, self.cfg), 'schedule = 5m', '']
        return '\n'.join(lines)

    def steps(self, convert=False):
        """The steps, in the order apply takes them."""
        steps = []
        kept = os.path.join(self.identity, STATE)
        steps.append(Step('state', self.state is not None, 'what adopt'
                          ' changes is recorded in %s (moves with the node;'
                          ' `slaposha slapos release` undoes it)' % kept))
        enabled = [e for e in self.entries if not e.disabled]
        steps.append(Step('cron', not enabled, '%s: %d cron entr%s that run'
                          ' `slapos node` disabled, kept in their file' % (
                              ', '.join(sorted({e.path for e in
                                                self.entries})) or 'cron',
                              len(self.entries),
                              'y' if len(self.entries) == 1 else 'ies')
                          if self.entries else 'no cron entry runs `slapos'
                          ' node` here'))
        if self.re6st:
            try:
                unit = self.units.state(RE6ST_UNIT)
            except UnitError as e:
                steps.append(Step('re6st_unit', False, '%s stopped and'
                                  ' disabled' % RE6ST_UNIT, str(e)))
            else:
                if unit is not None:
                    steps.append(Step(
                        're6st_unit', unit[0] in OFF and unit[1] != 'active',
                        '%s (this host\'s own re6st daemon) stopped and'
                        ' disabled: the agent runs the node\'s daemon where'
                        ' the node runs (it is %s, %s)' % (
                            RE6ST_UNIT, unit[0], unit[1])))
        kind, detail = data_state(self.node.instance_root)
        root = self.node.instance_root
        if kind == 'subvolume':
            steps.append(Step('data', True, '%s is a btrfs subvolume (file'
                              ' system at %s)' % (root, detail)))
        elif kind == 'folder':
            blocker = None
            if not convert:
                blocker = (
                    '%s is a folder on the btrfs file system at %s, not a'
                    ' subvolume: with the node\'s programs stopped (`%s node'
                    ' supervisorctl --cfg %s shutdown`), run again with'
                    ' --convert: it moves the data into a new subvolume at'
                    ' the same path (a copy with reflinks: no data written'
                    ' twice; the folder is kept as %s.before-slaposha)' % (
                        root, detail, self.slapos, self.cfg, root))
            steps.append(Step('data', False, 'the data of %s moved into a'
                              ' new btrfs subvolume at the same path' % root,
                              blocker))
        else:
            parent = os.path.dirname(root)
            steps.append(Step('data', False, '%s on a btrfs subvolume' % root,
                              '%s is %s: slaposha replicates it as a btrfs'
                              ' subvolume below a btrfs file system root. To'
                              ' get there, with the node\'s programs stopped:'
                              '\n  mkfs.btrfs DEVICE     # a disk or'
                              ' partition for the node\'s data'
                              '\n  mount DEVICE /mnt && cp -a %s/. /mnt/ &&'
                              ' umount /mnt'
                              '\n  mv %s %s.before-slaposha && mkdir %s &&'
                              ' mount DEVICE %s     # and in /etc/fstab'
                              '\nthen run `slaposha slapos adopt --apply'
                              ' --convert`: it makes %s a subvolume there' % (
                                  root, 'not on btrfs (%s)' % detail
                                  if 'btrfs' not in detail else detail,
                                  parent, parent, parent, parent, parent,
                                  root)))
        steps.append(Step('definition', self._definition_done(),
                          '`slapos node format` pins today\'s addresses: %s'
                          ' [slapformat] input_definition_file = %s' % (
                              self.cfg, self._format_key()
                              if self._definition_done() else
                              self._definition_path())))
        copy = identity.copy_path(self.node)
        steps.append(Step('identity', os.path.isdir(copy), 'the node\'s'
                          ' identity (%s) saved into the data (%s)' % (
                              self.identity, copy)))
        from slaposha.slapos.parameters import parameters_path
        steps.append(Step('parameters', os.path.exists(parameters_path(
            self.node)), 'the instance parameters from the master (%s)'
            ' saved into the data (%s)' % (self.node.master_url,
                                          parameters_path(self.node))))
        exists = os.path.exists(self.service_file)
        steps.append(Step('service', exists, 'service file %s%s' % (
            self.service_file, ' (kept as it is)' if exists else '')))
        if not self.cluster.cluster.tls:
            steps.insert(0, Step('cluster', False, 'the cluster replicates'
                                 ' over TLS', '%s: [cluster] tls = false:'
                                 ' the btrfs data replicates over TLS: set'
                                 ' tls = true (and give each host its'
                                 ' certificate)' % self.cluster.path))
        return steps

    def plan(self, convert=False):
        """What adopt does (or did), as lines."""
        node = self.node
        started = [p.id for p in self.partitions if p.started]
        size = _du(node.instance_root)
        out = ['adopt %s (%s) as service %s of cluster %s, hosts %s' % (
            node.computer_id, self.cfg, self.name, self.cluster.name,
            ' '.join(self.hosts)), '',
            'What moves with the node (to whichever host runs it):',
            '  - %s: %d partition(s), %d started%s' % (
                node.instance_root, len(self.partitions), len(started),
                ', %s' % human_bytes(size) if size is not None else ''),
            '  - its identity %s (slapos.cfg, certificates) and the instance'
            ' parameters, kept inside it' % self.identity]
        addresses = node.addresses()
        if addresses:
            out.append('  - the partitions\' addresses: %s' % ', '.join(
                '%s/%d on %s' % a for a in addresses[:6]) +
                (' and %d more' % (len(addresses) - 6)
                 if len(addresses) > 6 else ''))
        if self.re6st:
            out.append('  - re6st (%s): the node\'s place in the mesh'
                       % self.re6st)
        releases = node.software_releases()
        out.append('  - %d software release(s) of %s, copied to each standby'
                   ' once complete' % (len(releases), node.software_root))
        peers = [h for h in self.hosts if h != self.host]
        out += ['', 'What each peer (%s) must have (`slaposha slapos'
                ' prepare-standby` does what it can):' % (
                    ' '.join(peers) or 'none yet')]
        from slaposha.slapos.node import fingerprint
        users = fingerprint(node)['users']
        out.append('  - the users with the same uids and gids: %s' % ', '.join(
            '%s %d:%d' % (u, ids[0], ids[1]) for u, ids in
            sorted(users.items()) if ids))
        version = slapos_version(self.slapos)
        out.append('  - the same SlapOS install: %s%s' % (
            self.slapos, ' (slapos.core %s)' % version if version else ''))
        out.append('  - %s on a btrfs file system (instance_root arrives as'
                   ' snapshots), %s, interface(s) %s' % (
                       os.path.dirname(node.instance_root),
                       node.software_root, ' '.join(sorted({
                           node.interface, node.ipv6_interface}))))
        if self.re6st:
            out.append('  - re6st installed, its own service disabled (the'
                       ' agent runs the daemon where the node runs)')
        out += ['', 'What changes on this host:']
        for step in self.steps(convert):
            out.append('  [%s] %s' % ('done' if step.done else
                                      '    ', step.text))
            if step.blocker and not step.done:
                out += ['         ! ' + line
                        for line in step.blocker.splitlines()]
        return out

    # -- doing it --------------------------------------------------------------

    def apply(self, convert=False):
        """Every step not done yet, in order; lines saying what was done.
        Raises AdoptError (nothing changed) when a step cannot be done."""
        steps = self.steps(convert)
        for step in steps:
            if step.blocker and not step.done:
                raise AdoptError(step.blocker)
        done = []
        for step in steps:
            if step.done and step.name not in ('state', 'identity'):
                continue
            line = getattr(self, '_do_' + step.name)()
            if line:
                done.append(line)
        return done

    def _do_state(self):
        state = self.state or {'adopted': _now(), 'host': self.host,
                               'service': self.name, 'cron': {},
                               'entries': []}
        # Only what is not recorded yet: a run after a failure must keep
        # the originals, not what the first run changed.
        for path in sorted({e.path for e in self.entries}):
            if path not in state['cron']:
                with open(path) as f:
                    state['cron'][path] = f.read()
        for entry in self.entries:
            kept = [entry.timing, entry.user, entry.command]
            if kept not in state['entries']:
                state['entries'].append(kept)
        state.setdefault('input_definition_file', self._format_key())
        if state != self.state:
            write_state(self.identity, state)
            self.state = state
            return 'recorded what adopt changes in %s' % os.path.join(
                self.identity, STATE)
        return None

    def _do_re6st_unit(self):
        before = self.units.state(RE6ST_UNIT)
        if before is None:
            return None
        if 're6st_unit' not in self.state:  # the original, not a rerun's
            self.state['re6st_unit'] = before[0]
            write_state(self.identity, self.state)
        try:
            self.units.disable(RE6ST_UNIT)
        except UnitError as e:
            raise AdoptError(str(e))
        return '%s stopped and disabled (it was %s, %s)' % (
            RE6ST_UNIT, before[0], before[1])

    def _do_cron(self):
        changed = cron.disable(self.entries)
        self.entries = cron.entries(self.cron_dir, self.crontab)
        return 'cron: %d entr%s disabled (%s)' % (
            changed, 'y' if changed == 1 else 'ies', ', '.join(sorted(
                {e.path for e in self.entries})))

    def _do_data(self):
        root = self.node.instance_root
        busy = _slapgrid_running(self.config)
        pid = supervisord_pid(self.node)
        if not pid:
            busy += ['pid %d (%s) uses %s' % (p, name, root)
                     for p, name in processes_in(root)]
        if pid or busy:
            raise AdoptError(
                'the node is running (%s): stop its programs first: `%s node'
                ' supervisorctl --cfg %s shutdown` (its cron entries are'
                ' disabled now), then run again' % (
                    ', '.join((['instance supervisord pid %d' % pid]
                               if pid else []) + busy), self.slapos,
                    self.cfg))
        new = root + '.slaposha-new'
        old = root + '.before-slaposha'
        if os.path.lexists(old) and not os.path.exists(root):
            pass  # cut between the two renames: the copy is complete
        else:
            if os.path.lexists(new):  # a copy cut short: again
                _btrfs(['subvolume', 'delete', new])
            if os.path.lexists(old):
                raise AdoptError('%s exists already (an earlier conversion):'
                                 ' move it away first' % old)
            _btrfs(['subvolume', 'create', new])
            st = os.stat(root)
            p = subprocess.run(['cp', '-a', '--reflink=auto', root + '/.',
                                new + '/'], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT,
                               universal_newlines=True)
            if p.returncode:
                raise AdoptError('cannot copy %s into the new subvolume: %s'
                                 % (root, p.stdout.strip()[-300:]))
            os.chown(new, st.st_uid, st.st_gid)
            os.chmod(new, st.st_mode & 0o7777)
            os.rename(root, old)
        os.rename(new, root)
        return 'data: %s is now a btrfs subvolume; the former folder is kept' \
            ' as %s (delete it once the node runs well)' % (root, old)

    def _do_definition(self):
        path = self._definition_path()
        write_atomic(path, _definition(self.node))
        set_key(self.cfg, 'slapformat', 'input_definition_file', path)
        self.config = read_ini(self.cfg)
        return 'definition: %s pins the addresses of %d partition(s); %s' \
            ' [slapformat] input_definition_file points to it' % (
                path, len(self.partitions), self.cfg)

    def _do_identity(self):
        copy = identity.save(self.node, self.identity)
        return 'identity: %s saved into %s' % (self.identity, copy)

    def _do_parameters(self):
        from slaposha.slapos.parameters import ParametersError, fetch, save
        try:
            path = save(self.node, fetch(self.node, timeout=10))
        except ImportError:
            return 'parameters: not saved (the slap library, slapos.core, is' \
                ' not installed with slaposha)'
        except ParametersError as e:
            return 'parameters: not saved now (%s); the service\'s task saves' \
                ' them every 5 minutes' % e
        return 'parameters: saved in %s' % path

    def _do_service(self):
        os.makedirs(os.path.dirname(self.service_file), exist_ok=True)
        write_atomic(self.service_file, self.service_text())
        from slaposha.config import load_service
        load_service(self.service_file, self.cluster)  # what agents will say
        return 'service: %s written; copy it to the services folder of every' \
            ' host (%s)' % (self.service_file, ' '.join(self.hosts))


def _btrfs(args):
    p = subprocess.run(['btrfs'] + args, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, universal_newlines=True)
    if p.returncode:
        raise AdoptError('btrfs %s: %s' % (' '.join(args),
                                            p.stdout.strip()[-300:]))
