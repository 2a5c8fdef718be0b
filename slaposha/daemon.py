"""The agent's process: what the decision engine (:mod:`slaposha.agent`)
talks through, built and started in order, and stopped in the reverse.

The daemon builds the etcd clients (the loop's, the renewals' own
connections, the operators' actions', the watch's and the members'
view's), the membership, the watch of the cluster and the view of the etcd
members, and hands them to the :class:`~slaposha.agent.Agent`. Its start
opens the HTTPS and health APIs first (a broken PKI or a busy port stops
the agent before it started anything that would then be left running),
fences what a previous agent left, starts the replication receivers, the
embedded etcd member, the watchdog, the watch, and last the unix-socket
API. Its shutdown stops the APIs and the watch, lets the agent stop the
services here and give its lease back, then stops the receivers, the
watchdog and the member.

``slaposha agent``, ``slaposha witness`` and ``slaposha portal serve``
run through :func:`install_stop_signals`; a witness host runs only its
etcd member (:func:`run_witness`).
"""

import logging
import os
import signal
import socket

from slaposha import __version__
from slaposha.agent import Agent
from slaposha.api.health import HealthApi
from slaposha.api.https import HttpsApi
from slaposha.api.local import LocalApi
from slaposha.api.server import limits_of
from slaposha.cluster.etcd import Client
from slaposha.cluster.keys import Keys
from slaposha.cluster.lease import Membership
from slaposha.cluster.member import EtcdMember
from slaposha.cluster.view import EtcdView
from slaposha.cluster.watch import ClusterWatch
from slaposha.config import ConfigError
from slaposha.replication.receiver import Receiver, TreeReceiver
from slaposha.watchdog import Watchdog

__all__ = ['Daemon', 'default_host', 'run_witness', 'install_stop_signals']

# Its lines are the agent's.
logger = logging.getLogger('slaposha.agent')

# Seconds an operator's action may wait for etcd (an election lasts ~1-2 s).
ACTION_ETCD_TIMEOUT = 5.0


def default_host():
    return socket.gethostname().split('.')[0]


class Daemon(object):
    """The agent of ``host`` with its etcd clients, APIs, receivers,
    member and watchdog: ``run()`` until ``stop()``."""

    def __init__(self, cluster, host=None, services=None):
        self.cluster = cluster
        host = host or default_host()
        lease = cluster.lease
        endpoints = cluster.etcd_endpoints()
        if cluster.etcd.mode == 'embedded':
            # Our own member answers fastest: try it first.
            mine = endpoints[cluster.members.index(host)]
            endpoints = [mine] + [e for e in endpoints if e != mine]
        self.tls = cluster.tls_files(host)
        client_options = dict(request_timeout=lease.request_timeout,
                              retry_interval=lease.retry_interval,
                              tls=self.tls)
        client = Client(endpoints, timeout=lease.request_timeout * 2,
                        **client_options)
        cluster_keys = Keys(cluster.etcd.prefix, cluster.name)
        names = cluster.members if cluster.etcd.mode == 'embedded' else \
            cluster.etcd_endpoints()
        self.agent = Agent(
            cluster, host, services=services, tls=self.tls, client=client,
            # Renewals get their own connections: they never queue behind
            # a read.
            lease_client=Client(endpoints, **client_options),
            # Operators' actions run in the API's threads, not in the loop:
            # they may wait out an etcd election (a switch right after a
            # heal).
            action_client=Client(endpoints, timeout=ACTION_ETCD_TIMEOUT,
                                 **client_options),
            membership=Membership(client, cluster_keys, host),
            # What the cycles read: hosts and services, followed by a
            # watch. A change wakes the loop (DESIGN.md 8).
            world=ClusterWatch(
                Client(endpoints, timeout=lease.request_timeout * 2,
                       **client_options),
                cluster_keys, cluster.agent.resync_interval,
                on_change=lambda: self.agent.wake()),
            etcd_view=EtcdView(
                Client(cluster.etcd_endpoints(), **client_options),
                cluster.etcd_endpoints(), names,
                interval=cluster.agent.monitor_interval,
                timeout=lease.request_timeout))
        self.host = host
        self.api = None
        self.https_api = None
        self.health_api = None
        self.receivers = []

    def start(self):
        agent, cluster = self.agent, self.cluster
        for d in (cluster.cluster.run_dir, cluster.cluster.state_dir,
                  agent.log_dir):
            os.makedirs(d, exist_ok=True)
        # First: a broken PKI or a busy port stops the agent before it has
        # started anything that would then be left running.
        self.https_api = HttpsApi(agent, cluster, self.host).start()
        self.health_api = HealthApi(agent, cluster, self.host).start()
        agent.prepare()
        self._start_receivers()
        if cluster.etcd.mode == 'embedded':
            agent.member = EtcdMember(cluster, self.host,
                                      tls=self.tls).start()
        agent.watchdog = Watchdog().start()
        agent.world.start()
        self.api = LocalApi(agent, agent.socket_path,
                            limits_of(cluster.api)).start()
        agent.begin()
        logger.info('agent %s %s: %d service(s) here: %s', self.host,
                    __version__, len(agent.slots),
                    ' '.join(agent.slots) or '-')

    def run(self):
        """Run until stop() (or SIGTERM / SIGINT through the CLI)."""
        self.start()
        try:
            self.agent.loop()
        finally:
            self.shutdown()

    def stop(self):
        self.agent.stop()

    def shutdown(self):
        """Stop services here, hand ownership back, leave the cluster."""
        agent = self.agent
        agent.halt()  # a start that ends now is not carried on
        if self.api is not None:
            self.api.stop()
        if self.https_api is not None:
            self.https_api.stop()
        if self.health_api is not None:
            self.health_api.stop()
        agent.etcd_view.stop()
        agent.world.stop()
        agent.stop_services()
        for receiver in self.receivers:
            receiver.stop()
        if agent.watchdog is not None:
            agent.watchdog.stop()
        if agent.member is not None:
            agent.member.stop()
        agent.write_status()

    def _start_receivers(self):
        """Every host receives the data of the services it may run, owner
        or not: one receiver per port, over TLS with the cluster's CA; it
        serves btrfs volumes and rsync trees (and one-off copies)."""
        volumes, trees = {}, {}
        for slot in self.agent.slots.values():
            for res in slot.service.data():
                port, its_volumes, its_trees = res.receiver()
                volumes.setdefault(port, []).extend(its_volumes)
                trees.setdefault(port, []).extend(its_trees)
        if not volumes:
            return
        if self.tls is None:
            raise ConfigError(self.cluster.path, 'cluster', 'tls', 'btrfs'
                              ' and rsync resources replicate over TLS: set'
                              ' tls = true and give each host its'
                              ' certificate')
        address = self.cluster.hosts[self.host].address
        for port, paths in sorted(volumes.items()):
            self.receivers.append(Receiver(
                address, port, self.tls, paths,
                hosts=self.cluster.cluster.hosts,
                handlers=TreeReceiver(
                    trees.get(port, ()),
                    on_received=self.agent.copy_received).handlers,
                max_connections=self.cluster.replication.max_connections,
                max_peer_connections=(
                    self.cluster.replication.max_peer_connections),
                on_received=self.agent.copy_received).start())


def run_witness(cluster, host, stop_event):
    """Run only the etcd member of a witness host until ``stop_event``."""
    if cluster.etcd.mode != 'embedded':
        raise ValueError('a witness runs an embedded etcd member: [etcd]'
                         ' mode is external')
    for d in (cluster.cluster.run_dir, cluster.cluster.state_dir):
        os.makedirs(d, exist_ok=True)
    member = EtcdMember(cluster, host, tls=cluster.tls_files(host)).start()
    logger.info('witness %s: etcd member on %s', host, member.client_url)
    try:
        stop_event.wait()
    finally:
        member.stop()


def install_stop_signals(stop):
    """SIGTERM and SIGINT end the agent cleanly."""
    def handler(signum, frame):
        logger.info('signal %d: stopping', signum)
        stop()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
