"""slaposha: a SlapOS compute node as one highly available service.

Rooms, each one idea: ``config`` (parsing and validation of the cluster and
service files), ``cluster`` (etcd client, members, leases), ``lab`` (the
multi-host test lab of network and mount namespaces), ``cli`` (the
``slaposha`` command).
"""

__version__ = '0.1.0.dev0'
