"""``slapos``: a SlapOS compute node's partitions, restarted without buildout.

DESIGN.md 4 and reference/slapos-lab-takeover.md: after the data resource
has put instance_root, software_root and /etc/opt/slapos in place, start

1. the partitions' addresses, read from each ``.slapos-resource`` (IPv4 on
   ``interface_name``, IPv6 on ``ipv6_interface``, without DAD so that
   programs can bind at once), announced to the neighbours, and their IPv6
   ranges routed to this host as format routes them (``local RANGE dev
   lo``; stop and fence remove those routes);
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

With ``computer_address``, the computer's own address (``[computer]
address`` of the format definition file) is held by the owner like the
partitions' addresses: `slapos node format`, run by whichever host owns
the node, then finds it on the interface and posts it to the master
unchanged, instead of that host's own address.

No buildout, no ``slapos node boot`` (it deletes every ``.timestamp``), no
``slapos node instance`` (with the master reachable it would leave the
programs stopped). ``.timestamp`` files and their mtimes are not touched.
Stop does the reverse; fence kills the cgroup and drops the addresses.

An instance supervisord already running when the node is first put under
the agent (started by slapgrid) is adopted: it and its programs join the
resource's cgroup, so that a fence kills them too.

While it owns the node, the driver also keeps the standbys ready
(configured by the agent with ``configure``, worked in ``tick``, in a
thread of its own, never blocking the agent's cycle): the node's identity
in the replicated data, its software releases copied to every standby
(:mod:`slaposha.slapos.standbys`).

Standbys report the completed software releases they have (``report``);
the owner publishes what they must match (``publish``, the fingerprint of
:mod:`slaposha.slapos.node`) again whenever it changes, and a standby that
lacks a release the partitions run is not eligible, naming its URL.
"""

import ipaddress
import json
import logging
import os
import subprocess
import sys
import threading
import time
import xmlrpc.client

from slaposha.schema import Key
from slaposha.resources import (
    DOWN, UP, WARN, Resource, ResourceError, Status, announce, register)
from slaposha.resources.ip import IpError, run_ip
from slaposha.slapos.node import (
    NodeError, compare, fingerprint, load_node, local_facts)
from slaposha.slapos.partitions import (
    AsideBook, load_saved, missing_folders, partition_rows, refusal_reason,
    refused_partition, row_line)
from slaposha.slapos.standbys import Standbys
from slaposha.slapos.supervisor import STARTED, SUPERVISORD, rpc, state

__all__ = ['Slapos']

logger = logging.getLogger(__name__)

@register
class Slapos(Resource):
    """the partitions of a SlapOS node: addresses, supervisord, programs"""

    kind = 'slapos'
    ticks = True
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
            ' software release to the standbys that report they lack it'),
        Key('copy_interval', 'duration', 5.0, 'how often the owner compares'
            ' its completed software releases with what each standby'
            ' reports (a new report is acted on at once); a copy not yet in'
            ' a standby\'s report is not sent again within 3 intervals',
            minimum=0.5),
        Key('copy_retry', 'duration', 5.0, 'wait before a failed software'
            ' release copy is tried again; it doubles after each failure',
            minimum=0.1),
        Key('copy_retry_max', 'duration', 300.0, 'longest wait between two'
            ' tries of a failing software release copy', minimum=0.1),
        Key('copy_timeout', 'duration', 600.0, 'time allowed to one copy'
            ' of a software release to one standby', minimum=1.0),
        Key('aside_retry', 'duration', 30.0, 'how often the owner looks'
            ' again at the partitions set aside: one whose folder is back'
            ' is added to the running supervisord and started',
            minimum=1.0),
        Key('port', 'integer', 1216, 'the standbys\' replication port (their'
            ' receiver takes the software releases)'),
        Key('computer_address', 'boolean', False, 'the owner holds the'
            ' computer\'s own address ([computer] address of the format'
            ' definition file) like the partitions\', so that `slapos node'
            ' format` on any owner posts it to the master: an address of'
            ' the node alone, never a host\'s, and the lowest of its network'
            ' on every host (e.g. in a /64 of its own)'),
    )

    def __init__(self, section, context):
        Resource.__init__(self, section, context)
        self.peers = {}            # standby: address
        self.standbys = Standbys(self.rid, self.conf)
        self.failed = {}           # partition: why its programs did not start
        self._aside_next = 0.0     # monotonic time of the next look
        self._aside_worker = None

    def node(self):
        try:
            return load_node(self.conf.cfg)
        except NodeError as e:
            raise ResourceError('%s: %s' % (self.rid, e))

    # -- addresses ----------------------------------------------------------

    def _addresses(self, node, strict=True):
        """[(address, prefix, interface)] the owner holds: the partitions'
        and, with computer_address, the computer's own. Not ``strict``
        (fence, stop): an unreadable definition file costs the computer's
        address only."""
        found = node.addresses()
        if not self.conf.computer_address:
            return found
        try:
            own = node.computer_address()
        except NodeError as e:
            if strict:
                raise ResourceError('%s: computer_address: %s' % (self.rid, e))
            logger.warning('%s: computer_address: %s', self.rid, e)
            return found
        if own is None:
            return found
        hosts = [h for h, a in sorted(self.peers.items()) if a == own[0]]
        if hosts and not strict:
            return found
        if hosts:
            # Never take (nor later drop) a host's own address.
            raise ResourceError(
                '%s: computer_address: %s, [computer] address of %s, is the'
                ' address of host %s: give the node an address of its own'
                % (self.rid, own[0], node.definition_file, ' '.join(hosts)))
        return [(own[0], own[1], node.device(own[0]))] + found

    def _ip_batch(self, verb, addresses):
        lines = []
        for addr, prefix, dev in addresses:
            line = 'addr %s %s/%d dev %s' % (verb, addr, prefix, dev)
            if verb == 'replace' and ':' in addr:
                line += ' nodad'
            lines.append(line)
        if not lines:
            return
        failed = _ip_batch([], '\n'.join(lines) + '\n')
        if failed and verb == 'replace':
            raise ResourceError('%s: cannot add partition addresses: %s'
                                % (self.rid, failed))

    def _ranges(self, verb, networks):
        """Route (``replace``) or stop routing (``del``) each partition's
        IPv6 range to this host, as format does (reference/slapos-internals.md
        1.4); a start also allows binding their addresses."""
        if not networks:
            return
        if verb == 'replace':
            try:
                with open('/proc/sys/net/ipv6/ip_nonlocal_bind', 'w') as f:
                    f.write('1\n')
            except OSError as e:
                raise ResourceError('%s: cannot allow binding the partitions\''
                                    ' IPv6 ranges (net.ipv6.ip_nonlocal_bind):'
                                    ' %s' % (self.rid, e.strerror or e))
        failed = _ip_batch(['-6'], ''.join(
            'route %s local %s dev lo\n' % (verb, net) for net in networks))
        if failed and verb == 'replace':
            raise ResourceError('%s: cannot route the partitions\' IPv6 ranges:'
                                ' %s' % (self.rid, failed))

    def _node_ranges(self, node):
        try:
            return node.ipv6_ranges()
        except NodeError as e:
            logger.warning('%s: %s', self.rid, e)
            return []

    def _announce(self, addresses):
        if not self.conf.announce:
            return
        by_dev = {}
        for addr, prefix, dev in addresses:
            by_dev.setdefault(dev, []).append(addr)
        for dev, addrs in by_dev.items():
            try:
                announce.announce(dev, addrs)
            except OSError:
                pass  # a neighbour learns late; the service still runs

    def _format_would_post(self, node):
        """The address `slapos node format` would post here as the
        computer's (slapos.format: the lowest global address of the IPv6
        interface in the network of the pinned one), or None when it is the
        pinned one or unknown."""
        try:
            own = node.computer_address()
        except NodeError as e:
            return str(e)
        if own is None:
            return None
        p = subprocess.run(['ip', '-j', '-6', 'addr', 'show', 'dev',
                            node.ipv6_interface, 'scope', 'global'],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                           universal_newlines=True)
        try:
            infos = json.loads(p.stdout or '[]')
        except ValueError:
            return None
        mine = ipaddress.ip_address(own[0])
        held = [ipaddress.ip_interface('%s/%s' % (a['local'], a['prefixlen']))
                for info in infos for a in info.get('addr_info', [])
                if a.get('family') == 'inet6']
        suitable = [i.ip for i in held if mine in i.network]
        chosen = min(suitable) if suitable else None
        if chosen is None or chosen == mine:
            return None
        return ('`slapos node format` here would post %s as the computer\'s'
                ' address, not %s ([computer] address): %s is lower in the'
                ' same network; give the node a network of its own'
                % (chosen, own[0], chosen))

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

    def _set_aside(self, book, pid, reason, cause='refused'):
        book.set_aside(pid, reason, cause)
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
            self._set_aside(book, pid, reason, 'folder')
        deadline = time.monotonic() + self.conf.timeout
        # As slapgrid does: its configuration, an empty environment. The
        # daemon's parent returns once the socket is bound.
        argv = self.cgroup.wrap([sys.executable, '-c', SUPERVISORD,
                                 node.supervisord_conf])
        env = {'PYTHONPATH': os.pathsep.join(p for p in sys.path if p)}
        while True:
            # Launched only while the start goes on: never after a fence.
            p = self.launch(argv, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True)
            try:
                output = p.communicate(timeout=self.conf.timeout)[0]
            except subprocess.TimeoutExpired:
                p.kill()
                output = p.communicate()[0]
                raise ResourceError('%s: supervisord did not start within'
                                    ' %gs: %s' % (self.rid, self.conf.timeout,
                                                  output.strip()[-300:]))
            if not p.returncode:
                break
            # One partition's file refused: set it aside, start the others.
            pid = refused_partition(node, output)
            if pid is None or time.monotonic() > deadline:
                raise ResourceError('%s: supervisord did not start: %s' % (
                    self.rid, output.strip()[-300:]))
            self._set_aside(book, pid, refusal_reason(output))
        if book.records and not any(node.program_files().values()):
            raise ResourceError('%s: no partition can start: %s' % (
                self.rid, '; '.join('%s %s' % (pid, r['reason']) for pid, r
                                    in sorted(book.records.items()))))
        while state(node) != 'RUNNING':
            self.go_on('supervisord runs')
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
                why = _start_group(server, part.id)
            except OSError as e:
                raise ResourceError('%s: %s: supervisord: %s'
                                    % (self.rid, part.id, e))
            if why is None:
                started += 1
                continue
            self.failed[part.id] = why
            logger.warning('%s: partition %s set aside: %s', self.rid,
                           part.id, why)
        if self.failed and not started:
            raise ResourceError('%s: no partition started: %s' % (
                self.rid, '; '.join('%s %s' % item for item in
                                    sorted(self.failed.items()))))

    # -- verbs --------------------------------------------------------------

    def start(self):
        self.cgroup.create()
        self.standbys.install_identity()
        node = self.node()
        addresses = self._addresses(node)
        self.go_on('the addresses')
        self._ip_batch('replace', addresses)
        self._ranges('replace', self._node_ranges(node))
        self._announce(addresses)
        self.go_on('supervisord')
        self._launch_supervisord(node)
        self.go_on('the partitions')
        self._start_partitions(node)

    def stop(self):
        worker = self._aside_worker
        if worker is not None:
            worker.join(self.conf.timeout)  # it adds to what stops now
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
        self._ip_batch('del', self._addresses(node, strict=False))
        self._ranges('del', self._node_ranges(node))
        self.cgroup.remove()

    def fence(self):
        self.cgroup.kill()
        self.suspend()

    def suspend(self):
        """The partitions' addresses and ranges dropped; supervisord and
        the partitions' programs are frozen with the service's cgroup."""
        try:
            node = self.node()
            self._ip_batch('del', self._addresses(node, strict=False))
            self._ranges('del', self._node_ranges(node))
        except (ResourceError, NodeError):
            pass

    def resume(self):
        """The addresses and ranges back and announced, as at start."""
        try:
            node = self.node()
        except NodeError as e:
            raise ResourceError('%s: %s' % (self.rid, e))
        addresses = self._addresses(node)
        self._ip_batch('replace', addresses)
        self._ranges('replace', self._node_ranges(node))
        self._announce(addresses)

    def fence_targets(self):
        # Before a takeover promotes the data, the node may not be there
        # yet: nothing of it to drop then; asked again once started.
        try:
            addresses = [('%s/%d' % (a, p), d) for a, p, d in
                         self._addresses(self.node(), strict=False)]
        except (ResourceError, NodeError):
            addresses = []
        return [self.cgroup.path], addresses

    # -- keeping the standbys ready ------------------------------------------

    def configure(self, token, peers, tls, host):
        """From the agent on the owner: the standbys ({name: address}), the
        TLS files and this host's name (the token is not needed: software
        releases never change once completed)."""
        self.peers = dict(peers)
        self.standbys.configure(peers, tls, host)

    def reported(self, reports):
        """On the owner, every agent cycle: the completed software releases
        each standby has ({host: report or None})."""
        self.standbys.reported(reports)

    def report(self):
        """On a standby: the completed software releases it has."""
        try:
            return {'software': self.node().completed_releases()}
        except (ResourceError, NodeError):
            return None

    def tick(self):
        """On the owner, every agent cycle: the standbys' identity and
        software release copies (:mod:`slaposha.slapos.standbys`), and the
        partitions set aside that were repaired meanwhile."""
        self.standbys.tick()
        now = time.monotonic()
        worker = self._aside_worker
        if now < self._aside_next or (worker is not None and
                                      worker.is_alive()):
            return
        self._aside_next = now + self.conf.aside_retry
        self._aside_worker = threading.Thread(
            target=self._retry_aside, name='%s-aside' % self.rid,
            daemon=True)
        self._aside_worker.start()

    def _retry_aside(self):
        """Start each partition set aside whose folder is back, in the
        running supervisord, without touching the others."""
        try:
            node = load_node(self.conf.cfg)
            book = AsideBook(node)
            repaired = book.repaired()
            if repaired and state(node) == 'RUNNING':
                for pid in repaired:
                    self._start_repaired(node, book, pid)
        except (NodeError, OSError, xmlrpc.client.Error) as e:
            logger.warning('%s: partitions set aside: %s', self.rid, e)
        except Exception:  # never let the thread die silently
            logger.exception('%s: partitions set aside', self.rid)

    def _start_repaired(self, node, book, pid):
        # Its addresses first: the node's start did not see them (they are
        # read from the partition's folder). The next monitor adds them
        # to what the watchdog drops in a fence; fence and stop read them
        # afresh.
        part, = [p for p in node.partitions() if p.id == pid]
        addresses = [(addr, prefix, node.device(addr))
                     for addr, prefix in part.addresses]
        self._ip_batch('replace', addresses)
        self._ranges('replace', [part.ipv6_range] if part.ipv6_range else [])
        self._announce(addresses)
        book.put_back(pid)
        server = rpc(node.supervisord_socket, self.conf.timeout)
        try:
            added = server.supervisor.reloadConfig()[0][0]
        except xmlrpc.client.Fault as e:
            # Still refused: aside again, with what supervisord says now.
            self._set_aside(book, pid, refusal_reason(e.faultString))
            return
        for group in added:
            try:
                server.supervisor.addProcessGroup(group)
            except xmlrpc.client.Fault:
                pass  # added meanwhile (ALREADY_ADDED)
        why = _start_group(server, pid)
        if why is not None:
            self.failed[pid] = why
            logger.warning('%s: partition %s repaired but %s', self.rid,
                           pid, why)
            return
        self.failed.pop(pid, None)
        logger.info('%s: partition %s repaired (its folder is back): its'
                    ' programs run again', self.rid, pid)

    def publish(self):
        """What a standby must have the same (DESIGN.md 4 and 6)."""
        try:
            return fingerprint(self.node())
        except NodeError as e:
            raise ResourceError('%s: %s' % (self.rid, e))

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
        wrong += self.standbys.problems(node)
        if self.conf.computer_address:
            posted = self._format_would_post(node)
            if posted:
                wrong.append(posted)
        details = [row_line(r) for r in rows]
        if wrong:
            return Status(WARN, 'degraded: %s%s; %s' % (
                '; '.join(wrong[:3]), ' (and %d more)' % (len(wrong) - 3)
                if len(wrong) > 3 else '', text), details)
        return Status(UP, text, details)


def _start_group(server, pid):
    """Start the programs of partition ``pid`` in the instance supervisord
    (``server``); None when they all started, else why not, in one line."""
    try:
        results = server.supervisor.startProcessGroup(pid, True)
    except xmlrpc.client.Fault as e:
        why = e.faultString
    else:
        bad = [r for r in results if r.get('status') != STARTED]
        if not bad:
            return None
        why = ', '.join('%s %s' % (r.get('name'), r.get('description'))
                        for r in bad[:3])
    return 'its programs did not start: %s' % why


def _ip_batch(args, commands):
    """Run ``ip ARGS -batch -``; what went wrong in one line, or None."""
    try:
        p = run_ip(args + ['-force', '-batch', '-'], commands, timeout=30)
    except IpError as e:
        return str(e)
    if p.returncode:
        return p.stderr.strip()[-300:] or 'ip: exit code %d' % p.returncode
    return None


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
