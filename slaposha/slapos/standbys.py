"""What the owner of a node does in the background to keep its standbys
ready to take over (the ``slapos`` resource's ``tick``, in a thread of its
own, never blocking the agent's cycle):

- the node's identity (``identity``, /etc/opt/slapos) is copied into the
  replicated data every ``identity_interval`` (:mod:`slaposha.slapos.
  identity`); a new owner installs it before it starts
  (:meth:`Standbys.install_identity`);
- every completed software release (``.completed``; it never changes
  after that) is copied to each standby that reports it lacks it, over the
  cluster's channel (:func:`slaposha.replication.push.copy_tree`, under
  /opt/slapgrid), so a takeover never builds; which copies are due, and
  the retries of those that failed, are :class:`~slaposha.slapos.releases.
  Copies`'s business.
"""

import logging
import os
import threading
import time

from slaposha.resources import ResourceError
from slaposha.slapos import identity
from slaposha.slapos.node import (
    NodeError, describe_release, load_node, release_url)
from slaposha.slapos.releases import Copies
from slaposha.units import human_seconds

__all__ = ['Standbys']

logger = logging.getLogger('slaposha.resources.slapos')


class Standbys(object):
    """The owner's side: ``conf`` is the ``slapos`` resource's section."""

    def __init__(self, rid, conf):
        self.rid = rid
        self.conf = conf
        self.peers = {}            # standby: address
        self.tls = None
        self.host = None
        self.copies = Copies(conf.copy_retry, conf.copy_retry_max,
                             3 * conf.copy_interval)
        self.reports = {}          # standby: set of its completed releases
        self.urls = {}             # release folder name: URL (or None)
        self._worker = None
        self._next_identity = 0.0
        self._next_copy = 0.0

    def configure(self, peers, tls, host):
        """The standbys ({name: address}), the TLS files and this host's
        name."""
        self.peers = dict(peers)
        self.tls = tls
        self.host = host

    def reported(self, reports):
        """The completed software releases each standby reported ({host:
        report or None}); a new report is acted on at once."""
        found = {host: set(report.get('software') or ())
                 for host, report in reports.items()
                 if isinstance(report, dict)}
        if found != self.reports:
            self.reports = found
            self._next_copy = 0.0

    # -- the identity -------------------------------------------------------

    def install_identity(self):
        """A new owner puts the identity kept in the data in place."""
        if not self.conf.identity:
            return
        try:
            node = load_node(self.conf.cfg)
        except NodeError:
            return  # no slapos.cfg here: the preflight says so
        identity.install(node, self.conf.identity)

    # -- the background work -------------------------------------------------

    def tick(self):
        """Every agent cycle: start the background work when it is due and
        none runs."""
        now = time.monotonic()
        if self._worker is not None and self._worker.is_alive():
            return
        retry = self.copies.next_retry()
        due_identity = self.conf.identity and now >= self._next_identity
        due_copy = self.conf.copy_software and self.peers and \
            self.tls and (now >= self._next_copy or
                          (retry is not None and now >= retry))
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

    def release(self, node, name):
        """'URL (folder)' of a software release of this node."""
        if name not in self.urls:
            self.urls[name] = release_url(os.path.join(node.software_root,
                                                       name))
        return describe_release(name, self.urls, node.software_root)

    def _copy_software(self, node):
        from slaposha.replication import Peer, ReplicationError
        from slaposha.replication.push import copy_tree
        reports = {peer: has for peer, has in self.reports.items()
                   if peer in self.peers}
        broken = set()
        for peer, name in self.copies.due(node.completed_releases(),
                                          reports):
            if peer in broken:
                continue
            folder = os.path.join(node.software_root, name)
            started = time.monotonic()
            try:
                copy_tree(folder, Peer(peer, self.peers[peer],
                                       self.conf.port),
                          folder, self.tls, self.host,
                          timeout=self.conf.copy_timeout)
            except ReplicationError as e:
                wait = self.copies.failed(peer, name, e)
                logger.warning('%s: cannot copy software release %s to %s'
                               ' (again in %s): %s', self.rid,
                               self.release(node, name), peer,
                               human_seconds(wait), e)
                broken.add(peer)  # e.g. a standby that is booting
                continue
            self.copies.sent(peer, name)
            logger.info('%s: software release %s copied to %s in %.1f s',
                        self.rid, self.release(node, name), peer,
                        time.monotonic() - started)

    def problems(self, node):
        """One line per software release copy that fails (for status)."""
        return self.copies.problems(lambda name: self.release(node, name))
