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

No buildout, no ``slapos node boot`` (it deletes every ``.timestamp``), no
``slapos node instance`` (with the master reachable it would leave the
programs stopped). ``.timestamp`` files and their mtimes are not touched.
Stop does the reverse; fence kills the cgroup and drops the addresses.
"""

import os
import subprocess
import sys
import time
import xmlrpc.client

from slaposha.config import Key
from slaposha.resources import (
    DOWN, UP, WARN, Resource, ResourceError, Status, announce, register)
from slaposha.slapos.node import (
    NodeError, compare, fingerprint, load_node, local_facts)

__all__ = ['Slapos']

SUPERVISORD = ('import sys; import supervisor.supervisord; '
               'sys.argv[1:1] = ["-c", sys.argv.pop(1)]; '
               'supervisor.supervisord.main()')


def _rpc(socket_path, timeout=5.0):
    from supervisor.xmlrpc import SupervisorTransport
    transport = SupervisorTransport(None, None, 'unix://' + socket_path)
    transport.timeout = timeout
    return xmlrpc.client.ServerProxy('http://127.0.0.1', transport=transport)


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
    )

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

    def _supervisord_state(self, node):
        try:
            return _rpc(node.supervisord_socket, 2.0).supervisor.getState()[
                'statename']
        except (OSError, xmlrpc.client.Error):
            return None

    def _launch_supervisord(self, node):
        if self._supervisord_state(node) == 'RUNNING':
            return
        if not os.path.exists(node.supervisord_conf):
            raise ResourceError('%s: %s is missing: this node never ran'
                                ' `slapos node instance`' % (
                                    self.rid, node.supervisord_conf))
        # As slapgrid does: its configuration, an empty environment. The
        # daemon's parent returns once the socket is bound.
        argv = self.cgroup.wrap([sys.executable, '-c', SUPERVISORD,
                                 node.supervisord_conf])
        env = {'PYTHONPATH': os.pathsep.join(p for p in sys.path if p)}
        p = subprocess.run(argv, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True,
                           timeout=self.conf.timeout)
        if p.returncode:
            raise ResourceError('%s: supervisord did not start: %s' % (
                self.rid, p.stdout.strip()[-300:]))
        deadline = time.monotonic() + self.conf.timeout
        while self._supervisord_state(node) != 'RUNNING':
            if time.monotonic() > deadline:
                raise ResourceError('%s: supervisord not RUNNING after %gs'
                                    % (self.rid, self.conf.timeout))
            time.sleep(0.02)

    # -- verbs --------------------------------------------------------------

    def start(self):
        self.cgroup.create()
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
        rpc = _rpc(node.supervisord_socket, self.conf.timeout)
        for part in node.partitions():
            if not part.started:
                continue
            try:
                rpc.supervisor.startProcessGroup(part.id, True)
            except xmlrpc.client.Fault as e:
                if 'ALREADY_STARTED' not in e.faultString:
                    raise ResourceError('%s: %s: %s' % (
                        self.rid, part.id, e.faultString))
            except OSError as e:
                raise ResourceError('%s: %s: supervisord: %s'
                                    % (self.rid, part.id, e))

    def stop(self):
        node = self.node()
        if self._supervisord_state(node) is not None:
            rpc = _rpc(node.supervisord_socket, self.conf.timeout)
            try:
                rpc.supervisor.stopAllProcesses(True)
                rpc.supervisor.shutdown()
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
        if self._supervisord_state(node) != 'RUNNING':
            return Status(DOWN, 'instance supervisord not running')
        started = {p.id for p in node.partitions() if p.started}
        try:
            infos = _rpc(node.supervisord_socket).supervisor.\
                getAllProcessInfo()
        except (OSError, xmlrpc.client.Error) as e:
            return Status(WARN, 'supervisord: %s' % e)
        running, other = 0, []
        for info in infos:
            if info['group'] not in started:
                continue
            if info['statename'] == 'RUNNING':
                running += 1
            elif info['statename'] not in ('EXITED',) or \
                    info['name'].endswith('-on-watch'):
                other.append('%s:%s %s' % (info['group'], info['name'],
                                           info['statename']))
        if other:
            return Status(WARN, '%d running; %s' % (running,
                                                    ', '.join(other[:5])))
        return Status(UP, '%d partition(s) started, %d program(s) running'
                      % (len(started), running))
