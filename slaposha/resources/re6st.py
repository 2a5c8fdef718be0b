"""``re6st``: the node's re6st daemon, with its config and state, moving with
the node.

Where a SlapOS node's IPv6 comes from re6st (SlapOS's IPv6 mesh), the
node's re6st identity decides its addresses: the certificate in
/etc/re6stnet (its common name is the node's prefix in the re6st network)
gives the daemon its address, ``<prefix>::1`` on re6st's ``main-interface``
(lo by default), and the node's subnet, out of which `slapos node format`
took the partitions' IPv6 addresses. So the identity (``config``: the
re6stnet.conf, ca.crt, cert.crt and the key) and the daemon's state
(``state``: cache.db of the network and the peers, babeld.state) move with
the node; the daemon then runs where the service runs::

    [btrfs#data]          the replicated data, first
    volume = /srv/slapgrid
    [re6st#net]           the node's prefix back on this host
    data = /srv/slapgrid/.slaposha/re6st
    [slapos#node]         the partitions' addresses out of that prefix,
    ...                   supervisord, programs

The partitions' IPv6 addresses are not re6st's business: they are in each
partition's ``.slapos-resource`` (in the replicated data), and the
``slapos`` driver adds them on ``ipv6_interface``; re6st makes them
reachable by routing the node's prefix to whichever host runs the daemon.
Hence the order: data, re6st, slapos.

- **start** (a new owner): the copy that the previous owner kept in the
  replicated data (``data``) is installed into ``config`` and ``state``
  (owners, modes and times kept; local files that the copy lacks are kept
  and listed in the log); the key stays 0600 and the copy's folder 0700.
  An address left by a daemon killed earlier on this host is dropped (re6st
  would refuse to add it again). Then the daemon (``command``) is started
  in the resource's cgroup as an ``app`` program is, and must still run
  after ``settle``.
- **tick** (the owner, every agent cycle): every ``save_interval``, a
  thread copies ``config`` and ``state`` into ``data``; never the agent's
  cycle. SQLite files (cache.db) are copied with SQLite's backup, so a
  write of the daemon never leaves a torn copy; the copy is written beside
  the last one and takes its place in one rename, so that a snapshot of the
  data taken meanwhile holds the last complete copy.
- **stop**: the daemon stops (SIGTERM: re6st removes its address and
  routes itself), then one last copy is made.
- **fence**: the cgroup is killed and the daemon's address dropped, without
  waiting for anything; ``fence_targets`` gives both to the watchdog.
- **status**: whether the daemon runs, the node's re6st address (or its
  exit code and last log line), and how old the saved copy is.

The agent runs the daemon: the host's own re6stnet service (the package's
systemd unit) must be disabled on every host of the service, or two
daemons would hold the same identity.
"""

import ipaddress
import json
import logging
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import threading
import time

from slaposha.cgroup import CgroupError
from slaposha.schema import Key, Section
from slaposha.resources import (
    DOWN, UP, WARN, ResourceError, Status, copy_folder, register)
from slaposha.resources.app import App
from slaposha.slapos.node import NodeError, load_node

__all__ = ['Re6st', 'read_conf', 'node_addresses', 'save_copy',
           'install_copy', 'saved_meta']

logger = logging.getLogger(__name__)

CONF = 're6stnet.conf'
# The folders of a copy, by name inside it.
PARTS = ('config', 'state')
SQLITE = b'SQLite format 3\x00'


@register
class Re6st(App):
    """the node's re6st daemon, its config and state moved with the node"""

    kind = 're6st'
    ticks = True
    keys = (
        Key('config', 'path', '/etc/re6stnet', 're6st\'s configuration'
            ' folder (re6stnet.conf, the node\'s certificate and key),'
            ' moved with the node'),
        Key('state', 'path', '/var/lib/re6stnet', 're6st\'s state folder'
            ' (cache.db of the network and peers, babeld.state), moved with'
            ' the node'),
        Key('data', 'path', None, 'where the owner keeps its copy of config'
            ' and state, inside the replicated data (default: from cfg)'),
        Key('cfg', 'path', None, 'a slapos.cfg: the copy is then kept in'
            ' <instance_root>/.slaposha/re6st when data is not given'),
        Key('command', 'string', None, 'the daemon, run in the foreground'
            ' (default: re6stnet @<config>/re6stnet.conf)'),
        Key('save_interval', 'duration', 10.0, 'how often the owner copies'
            ' config and state into data', minimum=1.0),
        Key('settle', 'duration', 0.5, 'the daemon must still run this long'
            ' after it was started, or the start failed', minimum=0.0),
        Key('timeout', 'duration', 30.0, 'time allowed to the daemon to'
            ' stop before it is killed', minimum=0.1),
    )

    @classmethod
    def validate(cls, section):
        if not section.data and not section.cfg:
            return ('data: needed, a folder inside the replicated data (or'
                    ' cfg, a slapos.cfg to keep it in its instance_root)')
        if _inside(section.state, section.config) or \
                _inside(section.config, section.state):
            return 'state: must not be config or inside it (got %s)' % \
                section.state
        if section.data:
            for key in PARTS:
                if _inside(section.data, getattr(section, key)) or \
                        _inside(getattr(section, key), section.data):
                    return 'data: must be outside %s %s (got %s)' % (
                        key, getattr(section, key), section.data)
        return None

    def __init__(self, section, context):
        # App's verbs read its own keys too: the daemon is a foreground
        # command, with no start, stop or check command of its own.
        values = dict(start=None, stop=None, check=None, cwd=None,
                      user=None, group=None)
        values.update(section.as_dict())
        self.default_command = not values['command']
        if self.default_command:
            values['command'] = 're6stnet @%s' % os.path.join(
                section.config, CONF)
        App.__init__(self, Section(section.rid, values), context)
        self.address = None        # (address/len, dev) while known
        self.saved = None          # wall time of the copy last saved/installed
        self.save_error = None
        self.exit_code = None      # of a daemon that exited by itself
        self._running = False
        self._in_place = False     # config and state are the node's here
        self._worker = None
        self._next_save = 0.0

    def data(self):
        if self.conf.data:
            return self.conf.data
        try:
            node = load_node(self.conf.cfg)
        except NodeError as e:
            raise ResourceError('%s: cfg: %s' % (self.rid, e))
        return os.path.join(node.instance_root, '.slaposha', 're6st')

    def _folders(self):
        return {'config': self.conf.config, 'state': self.conf.state}

    # -- verbs --------------------------------------------------------------

    def start(self):
        if self._running and self.proc is not None and \
                self.proc.poll() is None:
            return
        data = self.data()
        try:
            kept = install_copy(data, self._folders())
        except (OSError, ResourceError, subprocess.SubprocessError) as e:
            raise ResourceError('%s: cannot install the saved copy from %s:'
                                ' %s' % (self.rid, data, e))
        self._in_place = True
        meta = saved_meta(data)
        if kept is None:
            logger.info('%s: no saved copy in %s: the daemon starts with'
                        ' this host\'s %s', self.rid, data, self.conf.config)
        else:
            self.saved = meta.get('saved')
            logger.info('%s: installed the copy saved %s by %s', self.rid,
                        _age(self.saved), meta.get('host', '?'))
            if kept:
                logger.warning('%s: kept %d local file(s) that the copy'
                               ' lacks: %s', self.rid, len(kept),
                               ', '.join(kept[:10]))
        if self.default_command and not os.path.exists(os.path.join(self.conf.config, CONF)):
            raise ResourceError('%s: config: %s is missing' % (
                self.rid, os.path.join(self.conf.config, CONF)))
        if meta.get('address') and not (self.cgroup.exists() and
                                         self.cgroup.pids()):
            self.address = tuple(meta['address'])
            if _drop(self.address):
                logger.info('%s: dropped %s on %s, left by a daemon that was'
                            ' killed here', self.rid, *self.address)
        self.exit_code = None
        self.go_on('the daemon')
        try:
            App.start(self)
        except CgroupError as e:
            raise ResourceError('%s: %s' % (self.rid, e))
        except ResourceError as e:
            raise ResourceError('%s: %s' % (e, self._last_line()))
        deadline = time.monotonic() + self.conf.settle
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.exit_code = self.proc.returncode
                raise ResourceError('%s: the daemon exited with code %s: %s'
                                    % (self.rid, self.exit_code,
                                       self._last_line()))
            time.sleep(0.02)
        self._running = True
        self._next_save = time.monotonic() + self.conf.save_interval

    def stop(self):
        self._running = False
        self._join()
        App.stop(self)
        if self.address is not None:
            _drop(self.address)  # re6st's own cleanup did not run
        # The daemon is stopped: this copy is the consistent one. Not after
        # a start that failed to install the copy: this host's config and
        # state would replace the node's.
        if self._in_place:
            self._save()
        self._in_place = False

    def fence(self):
        self._running = False
        self._in_place = False
        self.cgroup.kill()
        if self.address is not None:
            _drop(self.address)

    def suspend(self):
        """The daemon is frozen with the service's cgroup; its address
        dropped (routes kept), put back by resume()."""
        if self.address is not None:
            net, dev = self.address
            subprocess.run(['ip', '-6', 'addr', 'del', net, 'dev', dev],
                           stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=5)

    def resume(self):
        if self.address is not None and self._running:
            net, dev = self.address
            p = subprocess.run(['ip', '-6', 'addr', 'replace', net, 'dev',
                                dev, 'nodad'], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE,
                               universal_newlines=True, timeout=5)
            if p.returncode:
                raise ResourceError('%s: cannot put %s back on %s: %s' % (
                    self.rid, net, dev, p.stderr.strip()))

    def fence_targets(self):
        addresses = [self.address] if self.address is not None else []
        return [self.cgroup.path], addresses

    def tick(self):
        """On the owner, every agent cycle: start a save when it is due and
        none runs."""
        now = time.monotonic()
        if not self._running or now < self._next_save or \
                (self._worker is not None and self._worker.is_alive()):
            return
        self._next_save = now + self.conf.save_interval
        self._worker = threading.Thread(target=self._save,
                                        name='%s-save' % self.rid,
                                        daemon=True)
        self._worker.start()

    def _join(self):
        if self._worker is not None:
            self._worker.join(self.conf.timeout)
            self._worker = None

    def _save(self):
        """Copy config and state into the data; a failure is logged and
        shown in status, never raised (the last copy stays)."""
        try:
            if self._running:
                found = node_addresses(self._main_interface())
                self.address = found[0] if found else self.address
            meta = save_copy(self.data(), self._folders(), extra={
                'address': list(self.address) if self.address else None})
        except (OSError, ResourceError, sqlite3.Error) as e:
            self.save_error = str(e)
            logger.warning('%s: cannot save config and state: %s',
                           self.rid, e)
            return
        except Exception as e:  # never let the thread die silently
            self.save_error = str(e)
            logger.exception('%s: saving config and state', self.rid)
            return
        self.save_error = None
        self.saved = meta['saved']

    def status(self):
        if self.proc is not None and self.proc.poll() is not None:
            self.exit_code = self.proc.returncode
        state, message = App.status(self)
        if state != UP:
            if self.exit_code is not None:
                return Status(DOWN, 'the daemon exited with code %s: %s' % (
                    self.exit_code, self._last_line()))
            return Status(DOWN, 'the daemon is not running')
        parts = ['daemon running (%s)' % message]
        found = node_addresses(self._main_interface())
        if found:
            self.address = found[0]
            parts.append('node address %s on %s' % found[0])
        if self.saved is not None:
            parts.append('saved %s' % _age(self.saved))
        if self.save_error:
            parts.append('last save failed: %s' % self.save_error)
            return Status(WARN, '; '.join(parts))
        if not found:
            parts.append('no re6st address on %s yet' % self._main_interface())
            return Status(WARN, '; '.join(parts))
        return Status(UP, '; '.join(parts))

    def _main_interface(self):
        try:
            conf = read_conf(os.path.join(self.conf.config, CONF))
        except OSError:
            conf = {}
        return (conf.get('main-interface') or ['lo'])[-1]

    def _last_line(self):
        try:
            with open(self.log_path(), 'rb') as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 2000))
                lines = f.read().decode('utf-8', 'replace').strip()
        except OSError:
            return 'no log'
        return (lines.splitlines() or ['no output'])[-1][-200:]


# -- re6st's configuration and addresses -------------------------------------

def read_conf(path):
    """re6stnet.conf as {option: [values]}: one ``option value`` a line, as
    re6stnet reads it with ``@file``; # starts a comment."""
    options = {}
    with open(path) as f:
        for line in f:
            line = line.split('#', 1)[0].strip()
            if line:
                name, _, value = line.partition(' ')
                options.setdefault(name.lstrip('-'), []).append(
                    value.strip())
    return options


def node_addresses(dev):
    """[(address/len, dev)] of re6st's own address on ``dev``: re6stnet adds
    ``<prefix>::1`` with its prefix's length (utils.ipFromBin(subnet,
    '1')); the partitions' addresses out of that prefix are random."""
    try:
        links = json.loads(subprocess.run(
            ['ip', '-j', '-6', 'addr', 'show', 'dev', dev, 'scope',
             'global'], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            universal_newlines=True, timeout=5).stdout or '[]')
    except (OSError, ValueError, subprocess.SubprocessError):
        return []  # no such interface, or no ip: no address to show
    found = []
    for link in links:
        for info in link.get('addr_info', ()):
            try:
                net = ipaddress.ip_interface('%s/%s' % (
                    info['local'], info['prefixlen']))
            except (KeyError, ValueError):
                continue
            if net.version == 6 and net.network.prefixlen < 128 and \
                    int(net.ip) - int(net.network.network_address) == 1:
                found.append((str(net), dev))
    return found


def _drop(address):
    """Remove re6st's address and the unreachable route of its network
    that re6stnet adds; True when the address was there. Never raises: a
    fence calls it."""
    net, dev = address
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                 timeout=5)
    try:
        dropped = subprocess.run(['ip', '-6', 'addr', 'del', net, 'dev',
                                  dev], **quiet).returncode == 0
        ip = ipaddress.ip_interface(net).ip
        routes = json.loads(subprocess.run(
            ['ip', '-j', '-6', 'route', 'show', 'type', 'unreachable'],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            universal_newlines=True, timeout=5).stdout or '[]')
        for route in routes:
            dst = route.get('dst', '')
            if '/' in dst and ip in ipaddress.ip_network(dst, strict=False):
                subprocess.run(['ip', '-6', 'route', 'del', 'unreachable',
                                dst], **quiet)
    except (OSError, ValueError, subprocess.SubprocessError):
        return False
    return dropped


# -- the copy in the replicated data -------------------------------------------
#
#   <data>/         0700
#     current -> a  flipped in one rename once a copy is complete
#     a/ b/         config/ state/ saved.json

def saved_meta(data):
    """What saved.json of the current copy says ({} without a copy)."""
    try:
        with open(os.path.join(data, 'current', 'saved.json')) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def save_copy(data, folders, extra=None):
    """Copy ``folders`` ({part: folder}) into a new copy in ``data``, then
    make it the current one; returns its saved.json."""
    os.makedirs(data, mode=0o700, exist_ok=True)
    os.chmod(data, 0o700)
    current = os.path.join(data, 'current')
    slot = 'b' if os.path.realpath(current) == os.path.join(
        os.path.realpath(data), 'a') else 'a'
    target = os.path.join(data, slot)
    os.makedirs(target, mode=0o700, exist_ok=True)
    for part, folder in sorted(folders.items()):
        if not os.path.isdir(folder):
            if part == 'config':
                raise ResourceError('config: %s is not a folder' % folder)
            folder = None  # a state folder re6st has not made yet
        dst = os.path.join(target, part)
        if folder is None:
            shutil.rmtree(dst, ignore_errors=True)
            os.makedirs(dst, mode=0o700)
            continue
        copy_folder(folder, dst, delete=True, live=True)
        _copy_databases(folder, dst)
    _protect_keys(os.path.join(target, 'config'))
    meta = dict(extra or {}, saved=time.time(), host=socket.gethostname())
    with open(os.path.join(target, 'saved.json'), 'w') as f:
        json.dump(meta, f)
    subprocess.run(['sync', '-f', target], timeout=60)
    link = os.path.join(data, 'current.new')
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(slot, link)
    os.replace(link, current)
    return meta


def install_copy(data, folders):
    """Put the current copy in ``data`` into ``folders`` ({part: folder});
    local files the copy lacks stay. Returns their paths, or None when
    there is no copy."""
    current = os.path.join(data, 'current')
    if not os.path.isdir(current):
        return None
    kept = []
    for part, folder in sorted(folders.items()):
        src = os.path.join(current, part)
        if not os.path.isdir(src):
            continue
        copy_folder(src, folder, delete=False)
        for root, dirs, files in os.walk(folder):
            rel = os.path.relpath(root, folder)
            for name in dirs + files:
                if not os.path.lexists(os.path.join(src, rel, name)):
                    kept.append(os.path.normpath(os.path.join(root, name)))
            dirs[:] = [d for d in dirs
                       if os.path.isdir(os.path.join(src, rel, d))]
    _protect_keys(folders.get('config'))
    return sorted(kept)


def _protect_keys(config):
    """The node's key (``key`` of re6stnet.conf, and any *.key) readable by
    its owner only, wherever it is copied."""
    if not config or not os.path.isdir(config):
        return
    paths = {os.path.join(config, n) for n in os.listdir(config)
             if n.endswith('.key')}
    try:
        for value in read_conf(os.path.join(config, CONF)).get('key', []):
            # The copy holds the file under the same name as in config.
            paths.add(os.path.join(config, os.path.basename(value)))
    except OSError:
        pass
    for path in paths:
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            continue
        if stat.S_ISREG(mode) and mode & 0o077:
            os.chmod(path, stat.S_IMODE(mode) & 0o700)


def _copy_databases(src, dst):
    """Copy again, with SQLite's backup, each SQLite file of ``src``: a
    file copy taken during a write of the daemon may be torn."""
    for root, dirs, files in os.walk(src):
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, 'rb') as f:
                    if f.read(16) != SQLITE:
                        continue
            except OSError:
                continue
            out = os.path.join(dst, os.path.relpath(path, src))
            tmp = out + '.slaposha-new'
            source = sqlite3.connect('file:%s?mode=ro' % path, uri=True,
                                     timeout=5)
            try:
                copy = sqlite3.connect(tmp)
                try:
                    source.backup(copy)
                finally:
                    copy.close()
            finally:
                source.close()
            st = os.stat(path)
            os.chown(tmp, st.st_uid, st.st_gid)
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
            os.replace(tmp, out)


def _inside(path, folder):
    return path == folder or path.startswith(folder.rstrip('/') + '/')


def _age(wall):
    if wall is None:
        return 'never'
    seconds = max(0.0, time.time() - wall)
    return '%.1f s ago' % seconds if seconds < 10 else \
        '%d s ago' % round(seconds)
