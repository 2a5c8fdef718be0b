"""``slapos``: a SlapOS compute node's partitions, restarted without buildout.

DESIGN.md 4 and reference/slapos-lab-takeover.md: after the data resource
has put instance_root, software_root and /etc/opt/slapos in place, start

1. the partitions' addresses, read from each ``.slapos-resource`` (IPv4 on
   ``interface_name``, IPv6 on ``ipv6_interface``, without DAD so that
   programs can bind at once), announced to the neighbours;
2. the instance supervisord, launched as slapgrid launches it (its own
   configuration, an empty environment) in the resource's cgroup;
3. the programs of every started partition (those with a file in
   ``supervisord.conf.d``), through supervisor's XML-RPC.

One damaged partition never keeps the others down (DESIGN.md 6): a
partition that cannot start (its folder gone, a program file supervisord
refuses, programs that fail) is set aside with one line saying why, in the
log and the status; the others start and the node is degraded, not down
(:mod:`slaposha.slapos.partitions`). The status shows each partition: its
requested state, its running programs and what is wrong.

No buildout, no ``slapos node boot`` (it deletes every ``.timestamp``), no
``slapos node instance`` (with the master reachable it would leave the
programs stopped). ``.timestamp`` files and their mtimes are not touched.
Stop does the reverse; fence kills the cgroup and drops the addresses.

An instance supervisord already running when the node is first put under
the agent (started by slapgrid) is adopted: it and its programs join the
resource's cgroup, so that a fence kills them too.

While it owns the node, the driver also keeps the standbys ready
(configured by the agent with ``configure_peers``, worked in ``tick``, in a
thread of its own, never blocking the agent's cycle):

- the node's identity, ``identity`` (/etc/opt/slapos: slapos.cfg, the
  node's certificate and key, the partitions' certificates), is copied
  into the replicated data (``instance_root/.slaposha/identity``, 0700)
  every ``identity_interval``; a new owner installs it before it starts;
- every completed software release (``.completed``; it never changes
  after that) is copied once to each standby over the cluster's channel
  (:func:`slaposha.replication.rsync.copy_tree`, under /opt/slapgrid), so a
  takeover never builds; the standby's preflight lists what it still
  lacks.
"""

import logging
import os
import subprocess
import sys
import threading
import time
import xmlrpc.client

from slaposha.config import Key
from slaposha.resources import (
    DOWN, UP, WARN, Resource, ResourceError, Status, announce, register)
from slaposha.slapos import identity
from slaposha.slapos.node import (
    NodeError, compare, fingerprint, load_node, local_facts)
from slaposha.slapos.partitions import (
    AsideBook, load_saved, missing_folders, partition_rows, refusal_reason,
    refused_partition, row_line)
from slaposha.slapos.supervisor import STARTED, SUPERVISORD, rpc, state

__all__ = ['Slapos']

logger = logging.getLogger(__name__)

@register
class Slapos(Resource):
    """the partitions of a SlapOS node: addresses, supervisord, programs"""

    kind = 'slapos'
    keys = (
        Key('cfg', 'path', '/etc/opt/slapos/slapos.cfg', 'the node\'s'
            ' slapos.cfg (instance_root, software_root, interfaces)'),
        Key('announce', 'boolean', True, 'announce the partitions\''
            ' addresses (gratuitous ARP, unsolicited NA) after adding them'),
        Key('timeout', 'duration', 60.0, 'time allowed to start or stop'
            ' supervisord and the partitions\' programs', minimum=1.0),
        Key('identity', 'path', '/etc/opt/slapos', 'the node\'s identity'
            ' (slapos.cfg, certificates), kept in the replicated data by'
            ' its owner and installed by a new owner; empty: not moved'),
        Key('identity_interval', 'duration', 10.0, 'how often the owner'
            ' refreshes the copy of the identity in the replicated data',
            minimum=1.0),
        Key('copy_software', 'boolean', True, 'copy every completed'
            ' software release to the standbys'),
        Key('copy_interval', 'duration', 30.0, 'how often the owner looks'
            ' for software releases a standby lacks', minimum=1.0),
        Key('port', 'integer', 1216, 'the standbys\' replication port (their'
            ' receiver takes the software releases)'),
    )

    def __init__(self, section, context):
        Resource.__init__(self, section, context)
        self.peers = {}
        self.tls = None
        self.host = None
        self.copied = set()        # (peer, release folder) sent since start
        self.copy_errors = {}      # peer: last error, for status
        self.failed = {}           # partition: why its programs did not start
        self._worker = None
        self._next_identity = 0.0
        self._next_copy = 0.0

    def node(self):
        try:
            return load_node(self.conf.cfg)
        except NodeError as e:
            raise ResourceError('%s: %s' % (self.rid, e))

    # -- addresses ----------------------------------------------------------

    def _ip_batch(self, verb, addresses):
        lines = []
        for addr, prefix, dev in addresses:
            line = 'addr %s %s/%d dev %s' % (verb, addr, prefix, dev)
            if verb == 'replace' and ':' in addr:
                line += ' nodad'
            lines.append(line)
        if not lines:
            return
        p = subprocess.run(['ip', '-force', '-batch', '-'],
                           input='\n'.join(lines) + '\n',
                           universal_newlines=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        if p.returncode and verb == 'replace':
            raise ResourceError('%s: cannot add partition addresses: %s'
                                % (self.rid, p.stderr.strip()[-300:]))

    # -- supervisord --------------------------------------------------------

    def _adopt(self, node):
        """An instance supervisord this resource did not start (slapgrid
        did, before the node was put under the agent): it and every
        process below it join the resource's cgroup, so that stop and
        fence reach them. A child forked meanwhile is in the new group
        already once its parent moved."""
        try:
            pid = rpc(node.supervisord_socket, 2.0).supervisor.getPID()
        except (OSError, xmlrpc.client.Error):
            return
        mine = set(self.cgroup.pids())
        if pid in mine:
            return
        moved = []
        todo = [pid]
        while todo:
            p = todo.pop()
            try:
                self.cgroup.add(p)
                moved.append(p)
            except OSError:
                continue  # gone meanwhile
            todo.extend(_children(p))
        logger.info('%s: adopted the running instance supervisord (pid %d)'
                    ' and %d process(es) below it', self.rid, pid,
                    len(moved) - 1)

    def _set_aside(self, book, pid, reason):
        book.set_aside(pid, reason)
        logger.warning('%s: partition %s set aside: %s', self.rid, pid,
                       reason)

    def _launch_supervisord(self, node):
        if state(node) == 'RUNNING':
            self._adopt(node)
            return
        if not os.path.exists(node.supervisord_conf):
            raise ResourceError('%s: %s is missing: this node never ran'
                                ' `slapos node instance`' % (
                                    self.rid, node.supervisord_conf))
        # What was set aside is checked again: it may have been repaired.
        book = AsideBook(node)
        book.restore()
        for pid, reason in missing_folders(node).items():
            self._set_aside(book, pid, reason)
        deadline = time.monotonic() + self.conf.timeout
        # As slapgrid does: its configuration, an empty environment. The
        # daemon's parent returns once the socket is bound.
        argv = self.cgroup.wrap([sys.executable, '-c', SUPERVISORD,
                                 node.supervisord_conf])
        env = {'PYTHONPATH': os.pathsep.join(p for p in sys.path if p)}
        while True:
            p = subprocess.run(argv, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT,
                               universal_newlines=True,
                               timeout=self.conf.timeout)
            if not p.returncode:
                break
            # One partition's file refused: set it aside, start the others.
            pid = refused_partition(node, p.stdout)
            if pid is None or time.monotonic() > deadline:
                raise ResourceError('%s: supervisord did not start: %s' % (
                    self.rid, p.stdout.strip()[-300:]))
            self._set_aside(book, pid, refusal_reason(p.stdout))
        if book.records and not any(node.program_files().values()):
            raise ResourceError('%s: no partition can start: %s' % (
                self.rid, '; '.join('%s %s' % (pid, r['reason']) for pid, r
                                    in sorted(book.records.items()))))
        while state(node) != 'RUNNING':
            if time.monotonic() > deadline:
                raise ResourceError('%s: supervisord not RUNNING after %gs'
                                    % (self.rid, self.conf.timeout))
            time.sleep(0.02)

    def _start_partitions(self, node):
        """Start the programs of every started partition; one whose
        programs fail is reported, the others run."""
        server = rpc(node.supervisord_socket, self.conf.timeout)
        self.failed = {}
        started = 0
        for part in node.partitions():
            if not part.started:
                continue
            try:
                results = server.supervisor.startProcessGroup(part.id, True)
            except xmlrpc.client.Fault as e:
                why = e.faultString
            except OSError as e:
                raise ResourceError('%s: %s: supervisord: %s'
                                    % (self.rid, part.id, e))
            else:
                bad = [r for r in results if r.get('status') != STARTED]
                if not bad:
                    started += 1
                    continue
                why = ', '.join('%s %s' % (r.get('name'),
                                           r.get('description'))
                                for r in bad[:3])
            self.failed[part.id] = 'its programs did not start: %s' % why
            logger.warning('%s: partition %s set aside: %s', self.rid,
                           part.id, self.failed[part.id])
        if self.failed and not started:
            raise ResourceError('%s: no partition started: %s' % (
                self.rid, '; '.join('%s %s' % item for item in
                                    sorted(self.failed.items()))))

    # -- verbs --------------------------------------------------------------

    def start(self):
        self.cgroup.create()
        self._install_identity()
        node = self.node()
        addresses = node.addresses()
        self._ip_batch('replace', addresses)
        if self.conf.announce:
            by_dev = {}
            for addr, prefix, dev in addresses:
                by_dev.setdefault(dev, []).append(addr)
            for dev, addrs in by_dev.items():
                try:
                    announce.announce(dev, addrs)
                except OSError:
                    pass  # a neighbour learns late; the service still runs
        self._launch_supervisord(node)
        self._start_partitions(node)

    def stop(self):
        node = self.node()
        if state(node) is not None:
            server = rpc(node.supervisord_socket, self.conf.timeout)
            try:
                server.supervisor.stopAllProcesses(True)
                server.supervisor.shutdown()
            except (OSError, xmlrpc.client.Error) as e:
                raise ResourceError('%s: cannot stop supervisord: %s'
                                    % (self.rid, e))
            deadline = time.monotonic() + self.conf.timeout
            while self.cgroup.exists() and self.cgroup.pids():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        self.cgroup.kill()
        self._ip_batch('del', node.addresses())
        self.cgroup.remove()

    def fence(self):
        self.cgroup.kill()
        try:
            self._ip_batch('del', self.node().addresses())
        except (ResourceError, NodeError):
            pass

    def fence_targets(self):
        # Before a takeover promotes the data, the node may not be there
        # yet: nothing of it to drop then; asked again once started.
        try:
            addresses = [('%s/%d' % (a, p), d)
                         for a, p, d in self.node().addresses()]
        except (ResourceError, NodeError):
            addresses = []
        return [self.cgroup.path], addresses

    # -- keeping the standbys ready ------------------------------------------

    def configure_peers(self, token, peers, tls, host):
        """From the agent on the owner: the standbys ({name: address}), the
        TLS files and this host's name (the token is not needed: software
        releases never change once completed)."""
        self.peers = dict(peers)
        self.tls = tls
        self.host = host

    def _install_identity(self):
        """A new owner puts the identity kept in the data in place."""
        if not self.conf.identity:
            return
        try:
            node = load_node(self.conf.cfg)
        except NodeError:
            return  # no slapos.cfg here: the preflight says so
        identity.install(node, self.conf.identity)

    def tick(self):
        """On the owner, every agent cycle: start the background work when
        it is due and none runs."""
        now = time.monotonic()
        if self._worker is not None and self._worker.is_alive():
            return
        due_identity = self.conf.identity and now >= self._next_identity
        due_copy = self.conf.copy_software and self.peers and \
            self.tls and now >= self._next_copy
        if not (due_identity or due_copy):
            return
        if due_identity:
            self._next_identity = now + self.conf.identity_interval
        if due_copy:
            self._next_copy = now + self.conf.copy_interval
        self._worker = threading.Thread(
            target=self._keep_ready, args=(due_identity, due_copy),
            name='%s-standbys' % self.rid, daemon=True)
        self._worker.start()

    def _keep_ready(self, save_identity, software):
        try:
            node = load_node(self.conf.cfg)
            if save_identity:
                identity.save(node, self.conf.identity)
            if software:
                self._copy_software(node)
        except (NodeError, ResourceError) as e:
            logger.warning('%s: %s', self.rid, e)
        except Exception:  # never let the thread die silently
            logger.exception('%s: keeping the standbys ready', self.rid)

    def _copy_software(self, node):
        from slaposha.replication import Peer, ReplicationError
        from slaposha.replication.rsync import copy_tree
        releases = []
        for name in sorted(os.listdir(node.software_root)):
            folder = os.path.join(node.software_root, name)
            if os.path.exists(os.path.join(folder, '.completed')):
                releases.append(folder)
        for peer, address in sorted(self.peers.items()):
            for folder in releases:
                if (peer, folder) in self.copied:
                    continue
                started = time.monotonic()
                try:
                    copy_tree(folder, Peer(peer, address, self.conf.port),
                              folder, self.tls, self.host)
                except ReplicationError as e:
                    self.copy_errors[peer] = str(e)
                    logger.warning('%s: cannot copy %s to %s: %s', self.rid,
                                   folder, peer, e)
                    # e.g. a standby that is booting: soon again
                    self._next_copy = min(self._next_copy,
                                          time.monotonic() + 5.0)
                    break
                self.copy_errors.pop(peer, None)
                self.copied.add((peer, folder))
                logger.info('%s: software release %s copied to %s in %.1f s',
                            self.rid, os.path.basename(folder), peer,
                            time.monotonic() - started)

    def publish(self):
        """What a standby must have the same (DESIGN.md 4)."""
        return fingerprint(self.node())

    def problems(self, published):
        try:
            node = self.node()
        except ResourceError as e:
            return [str(e)]
        return compare(published, local_facts(node, published))

    def status(self):
        try:
            node = self.node()
        except ResourceError as e:
            return Status(DOWN, str(e))
        if state(node) != 'RUNNING':
            return Status(DOWN, 'instance supervisord not running')
        try:
            infos = rpc(node.supervisord_socket).supervisor.\
                getAllProcessInfo()
        except (OSError, xmlrpc.client.Error) as e:
            return Status(WARN, 'supervisord: %s' % e)
        try:
            rows = partition_rows(node, infos, load_saved(node),
                                  AsideBook(node).current(), self.failed)
        except NodeError as e:
            return Status(WARN, str(e))
        started = {r['id'] for r in rows if r['programs'] is not None}
        running = sum(1 for i in infos if i['group'] in started and
                      i['statename'] == 'RUNNING')
        text = '%d partition(s) started, %d program(s) running' % (
            len(started), running)
        wrong = ['%s %s' % (r['id'], r['problem']) for r in rows
                 if r['problem']]
        wrong += ['software to %s: %s' % item
                  for item in sorted(self.copy_errors.items())]
        details = [row_line(r) for r in rows]
        if wrong:
            return Status(WARN, 'degraded: %s%s; %s' % (
                '; '.join(wrong[:3]), ' (and %d more)' % (len(wrong) - 3)
                if len(wrong) > 3 else '', text), details)
        return Status(UP, text, details)


def _children(pid):
    """Direct children of ``pid`` (every thread's list)."""
    found = []
    try:
        tasks = os.listdir('/proc/%d/task' % pid)
    except OSError:
        return found
    for tid in tasks:
        try:
            with open('/proc/%d/task/%s/children' % (pid, tid)) as f:
                found.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return found
