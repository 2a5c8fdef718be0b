"""Where a cluster keeps everything in etcd, in one place.

Under ``<etcd prefix>/<cluster name>/``::

    hosts/<host>                  membership, JSON, on the host's lease
    services/<name>/owner         the owner host; create revision = token
    services/<name>/<key>         what the owner writes (state, facts),
                                  guarded by the token, and the operators'
                                  intents (frozen, target, switch, restore:
                                  slaposha.intents)
    exclusive/<name>/<host>       a host's claim of an exclusive name, taken
                                  with the owner key (slaposha.placement)
    history/<service>/<token>     the takeovers, switches and restores kept
                                  (slaposha.history)

The agent's watch (:mod:`slaposha.cluster.watch`) follows ``hosts/`` and
``services/`` and nothing between them: they sort next to each other.
"""

__all__ = ['Keys']


class Keys(object):
    """The keys of cluster ``cluster`` under ``prefix``."""

    def __init__(self, prefix, cluster):
        self.root = '%s/%s/' % (prefix.rstrip('/'), cluster)

    def host(self, name):
        return self.root + 'hosts/' + name

    @property
    def hosts(self):
        return self.root + 'hosts/'

    def service(self, name, key=''):
        return self.root + 'services/%s/%s' % (name, key)

    def owner(self, name):
        return self.service(name, 'owner')

    @property
    def services(self):
        return self.root + 'services/'

    @property
    def claims(self):
        return self.root + 'exclusive/'

    def claim(self, name, host):
        return self.claims + '%s/%s' % (name, host)

    def history(self, service=None):
        return self.root + 'history/' + ('%s/' % service if service else '')
