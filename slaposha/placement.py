"""Placement: services that exclude each other on one host (DESIGN.md 9).

Two SlapOS node services cannot run on one host: both want /srv/slapgrid,
/etc/opt/slapos, the same partition users. ``[service] exclusive = NAME...``
says so: services that share a name never run on one host at once. A
cluster of N node hosts then keeps one spare: when a node host dies its
node goes to the spare, never onto a host that runs another node, and when
no live host can take it, the agents say so (the decision ``wait``, shown
by ``slaposha status``).

Two things make it hold:

- the choice (:func:`occupied`): the agent skips a host whose owner keys
  show another service of a shared name there;
- the claim, which makes it impossible rather than unlikely: the owner key
  is taken in one etcd transaction with one claim key per name and host,
  ``exclusive/<name>/<host>``, that must not exist (:func:`claims`, used
  by :class:`slaposha.cluster.lease.Ownership`). Two services of one name
  can never both hold the claim of a host, whatever the agents saw when
  they chose: the choice reads a view that may be a cycle old (two
  services freed in the same cycle would both go to the spare), the
  transaction does not. The claims live on the owner's lease, as the owner
  key does, and go with it: released in the transaction that releases the
  owner key, expired with the lease.

A claim whose service is no longer owned by its host (its owner key was
deleted by something else than its owner's release) would keep other
services off that host for good: the host's own agent deletes it once it
sees that the service does not run there (:func:`refusal`).

:func:`collisions` finds services that could meet on one host with the same
paths and no name in common: loading the services refuses them.
"""

from slaposha.cluster.etcd import Compare, Op

__all__ = ['claims', 'occupied', 'blocking', 'refusal', 'collisions']

# Per resource kind, the keys that name what only one service may use on
# a host at a time.
PATH_KEYS = {
    'btrfs': ('volume',),
    'rsync': ('path',),
    'slapos': ('cfg',),
    're6st': ('config', 'state'),
    'fs': ('mount_point',),
    'drbd': ('device', 'disk'),
}


def claims(keys, conf, host):
    """The claim keys that taking ``conf``'s service on ``host`` needs."""
    return [keys.claim(name, host)
            for name in conf.service.exclusive]


def occupied(confs, owners, conf, host):
    """The service that keeps ``conf``'s off ``host``, with the name they
    share, or None. ``owners``: {service: owner host} as etcd last said;
    ``confs``: {service: ServiceConfig} of every service."""
    mine = set(conf.service.exclusive)
    if not mine:
        return None
    for name, owner in sorted(owners.items()):
        other = confs.get(name)
        if owner != host or name == conf.name or other is None:
            continue
        shared = mine.intersection(other.service.exclusive)
        if shared:
            return name, sorted(shared)[0]
    return None


def blocking(confs, owners, conf, host):
    """One line saying why ``host`` may not take ``conf``'s service, or
    None."""
    found = occupied(confs, owners, conf, host)
    if found is None:
        return None
    return '%s runs %s (exclusive = %s)' % (host, found[0], found[1])


def refusal(client, keys, host, claim, running_here, owner_kv):
    """Why a claim of ``host`` refused a service, as one line. A claim kept
    for a service that neither runs here (``running_here(name)``) nor is
    owned by this host (``owner_kv``: its owner key as last read, or None)
    is stale: it is dropped, only if neither changed since they were read,
    and the next cycle tries again."""
    name = claim.value
    group = claim.key[len(keys.claims):].split('/')[0]
    if running_here(name) or (owner_kv is not None and
                              owner_kv.value == host):
        return '%s runs %s (exclusive = %s)' % (host, name, group)
    owner_key = keys.owner(name)
    result = client.txn(
        compare=[Compare.mod_revision(claim.key, '==', claim.mod_revision),
                 Compare.create_revision(owner_key, '==', owner_kv.
                                         create_revision if owner_kv else 0)],
        success=[Op.delete(claim.key)])
    return 'the claim of %s on %s (exclusive = %s) was left without its' \
        ' service: %s' % (name, host, group, 'dropped' if result.succeeded
                          else 'it changed meanwhile')


def _used(conf):
    """{path: resource id} of what the service uses on its host."""
    found = {}
    for res in conf.resources:
        if getattr(res, 'disable', False):
            continue
        for key in PATH_KEYS.get(res.kind, ()):
            value = getattr(res, key, None)
            if value:
                found.setdefault(value, res.rid)
    return found


def collisions(services):
    """(ServiceConfig, ServiceConfig, host, path) of the first two services
    that may both run on one host, use the same path there and share no
    exclusive name; or None."""
    for i, a in enumerate(services):
        used = _used(a)
        for b in services[i + 1:]:
            if set(a.service.exclusive) & set(b.service.exclusive):
                continue
            hosts = [h for h in (a.service.hosts or ())
                     if h in (b.service.hosts or ())]
            if not hosts:
                continue
            common = sorted(set(used) & set(_used(b)))
            if common:
                return a, b, hosts[0], common[0]
    return None
