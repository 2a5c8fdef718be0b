"""A SlapOS compute node as slapgrid left it on disk, read from slapos.cfg.

What a takeover needs to know without asking the master, and without
running buildout (reference/slapos-internals.md, sections 1 to 3):

- the roots (instance_root, software_root) and the node's identity
  (computer_id, its certificate and key, the partitions' certificates);
- each partition: its folder, owner (uid/gid: slapgrid takes them from the
  folder), addresses from ``.slapos-resource`` (written by ``slapos node
  format``), the software release it runs (the ``software_release``
  symlink) and whether it is started (only started partitions have a
  program file in ``instance_root/etc/supervisord.conf.d``);
- the software releases: ``software_root/<md5 of the URL>``, complete once
  ``.completed`` is there, their URL read back from the ``buildout.cfg``
  that slapgrid writes in each (``extends = URL``);
- the interfaces that carry the partitions' IPv4 and IPv6 addresses, and
  the computer's own address pinned in the format definition file.

:func:`fingerprint` condenses what must be the same on a standby and
:func:`compare` says, one line per mismatch, what is wrong on the standby.

The fingerprint (published by the owner's agent in etcd, read by standbys
and ``slaposha slapos check``; ``slaposha slapos fingerprint`` prints it
with what preparing a standby needs besides, :mod:`slaposha.slapos.standby`)
is a JSON object, version 2 (FINGERPRINT_VERSION)::

    version            2 (absent in version 1)
    computer_id        the node's computer_id
    instance_root      paths, the same on every peer
    software_root
    users              {name: [uid, gid]}: slapsoft and each partition's user
    software_releases  [md5 folder]: the releases partitions run (a standby
                       must have each one completed)
    software_urls      {md5 folder: URL or null}          (version 2)
    partitions         {partition id: md5 folder or null}: the partitions
                       in use (not free)                  (version 2)
    interfaces         [name]: carry the partitions' addresses
    computer_address   "address/prefix" pinned in the format definition
                       file, or null                      (version 2)

Version 2 only adds keys: a reader of version 1 reads it unchanged.
"""

import configparser
import hashlib
import ipaddress
import json
import os
import pwd
import re

__all__ = ['Node', 'Partition', 'NodeError', 'load_node', 'fingerprint',
           'compare', 'local_facts', 'release_url', 'release_name',
           'DEFAULT_SLAPOS_CFG', 'FINGERPRINT_VERSION']

DEFAULT_SLAPOS_CFG = '/etc/opt/slapos/slapos.cfg'
FINGERPRINT_VERSION = 2


class NodeError(Exception):
    """The node cannot be read, as one line naming the file and key."""


class Partition(object):
    """One partition folder of instance_root."""

    def __init__(self, node, name):
        self.node = node
        self.id = name
        self.path = os.path.join(node.instance_root, name)
        st = os.stat(self.path)
        self.uid, self.gid = st.st_uid, st.st_gid
        self.resource = self._read_resource()
        user = self.resource.get('user')
        if isinstance(user, dict):  # format writes the User object's dict
            user = user.get('name')
        self.user = user or _user_name(self.uid)

    def __repr__(self):
        return '<Partition %s>' % self.id

    def _read_resource(self):
        path = os.path.join(self.path, '.slapos-resource')
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise NodeError('%s: unreadable (%s)' % (path, e))

    @property
    def addresses(self):
        """[(address, prefix length)] from .slapos-resource."""
        found = []
        for entry in self.resource.get('address_list') or []:
            addr, mask = entry.get('addr'), entry.get('netmask')
            if not addr:
                continue
            try:
                found.append((addr, _prefix(addr, mask)))
            except ValueError:
                raise NodeError('%s/.slapos-resource: bad address %r/%r'
                                % (self.path, addr, mask))
        return found

    @property
    def ipv6_range(self):
        """The partition's IPv6 range (``ipv6_range`` of .slapos-resource,
        written by format with partition_has_ipv6_range, its default) as
        a network 'addr/prefix', or None."""
        entry = self.resource.get('ipv6_range')
        network = entry.get('network') if isinstance(entry, dict) else None
        if not network:
            return None
        try:
            return str(ipaddress.IPv6Network(network, strict=False))
        except ValueError:
            raise NodeError('%s/.slapos-resource: bad ipv6_range %r'
                            % (self.path, network))

    @property
    def software_path(self):
        """The software release folder it runs, or None."""
        link = os.path.join(self.path, 'software_release')
        return os.path.realpath(link) if os.path.islink(link) else None

    @property
    def supervisord_conf(self):
        path = os.path.join(self.node.instance_root, 'etc',
                            'supervisord.conf.d', '%s.conf' % self.id)
        return path if os.path.exists(path) else None

    @property
    def started(self):
        return self.supervisord_conf is not None

    @property
    def in_use(self):
        """Deployed (a software release linked, or started); a free or
        destroyed partition is neither: slapgrid's destroy empties the
        folder and removes the program files."""
        return self.started or os.path.islink(
            os.path.join(self.path, 'software_release'))


def _prefix(addr, mask):
    """Prefix length of a netmask as format writes it: a length, or a
    mask address (255.255.255.255, ffff:ffff:ffff:ffff::)."""
    ip = ipaddress.ip_address(addr)
    if not mask:
        return ip.max_prefixlen
    if str(mask).isdigit():
        return int(mask)
    bits = bin(int(ipaddress.ip_address(mask))).count('1')
    if ipaddress.ip_address(mask).version != ip.version:
        raise ValueError(mask)
    return bits


def _user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


class Node(object):
    """The node described by a slapos.cfg, as it is on this host's disk."""

    def __init__(self, path, config):
        self.config_path = path
        slapos = dict(config['slapos']) if config.has_section('slapos') \
            else {}
        fmt = dict(config['slapformat']) if config.has_section(
            'slapformat') else {}
        for key in ('computer_id', 'instance_root', 'software_root'):
            if not slapos.get(key):
                raise NodeError('%s: [slapos] %s: required by slapgrid, is'
                                ' missing' % (path, key))
        self.computer_id = slapos['computer_id']
        self.master_url = slapos.get('master_url')
        self.instance_root = os.path.normpath(slapos['instance_root'])
        self.software_root = os.path.normpath(slapos['software_root'])
        self.cert_file = slapos.get('cert_file')
        self.key_file = slapos.get('key_file')
        self.certificate_repository_path = slapos.get(
            'certificate_repository_path')
        self.interface = fmt.get('interface_name') or 'lo'
        self.ipv6_interface = fmt.get('ipv6_interface') or self.interface
        self.software_user = fmt.get('software_user') or 'slapsoft'
        self.partition_base = fmt.get('partition_base_name') or 'slappart'
        self.definition_file = fmt.get('input_definition_file')

    @property
    def supervisord_conf(self):
        return os.path.join(self.instance_root, 'etc', 'supervisord.conf')

    @property
    def supervisord_socket(self):
        return os.path.join(self.instance_root, 'sv.sock')

    @property
    def supervisord_conf_dir(self):
        return os.path.join(self.instance_root, 'etc', 'supervisord.conf.d')

    def partition_key(self, name):
        """Sort key of a partition id (slappart2 before slappart10)."""
        tail = name[len(self.partition_base):]
        return (int(tail) if tail.isdigit() else -1, name)

    def partitions(self):
        """Partition folders (``slappartN``) of instance_root, in order."""
        try:
            names = os.listdir(self.instance_root)
        except OSError as e:
            raise NodeError('%s: [slapos] instance_root %s: %s' % (
                self.config_path, self.instance_root, e.strerror or e))
        base = self.partition_base
        found = [n for n in names if n.startswith(base) and
                 n[len(base):].isdigit() and
                 os.path.isdir(os.path.join(self.instance_root, n))]
        found.sort(key=self.partition_key)
        parts = []
        for name in found:
            try:
                parts.append(Partition(self, name))
            except FileNotFoundError:
                continue  # removed meanwhile (slapgrid, an operator)
        return parts

    def program_files(self, suffix='.conf'):
        """{partition id: [file names]} of supervisord.conf.d: each
        partition's ``<id>.conf`` and its managers' ``<id>-<x>.conf``, as
        slapgrid names them (``suffix``: another ending, e.g. the files
        set aside)."""
        pattern = re.compile(r'^(%s\d+)(-[^/]*)?%s$' % (
            re.escape(self.partition_base), re.escape(suffix)))
        try:
            names = sorted(os.listdir(self.supervisord_conf_dir))
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise NodeError('%s: %s' % (self.supervisord_conf_dir,
                                        e.strerror or e))
        found = {}
        for name in names:
            m = pattern.match(name)
            if m:
                found.setdefault(m.group(1), []).append(name)
        return found

    def software_releases(self):
        """Software release folders in use by partitions."""
        return sorted({p.software_path for p in self.partitions()
                       if p.software_path})

    def completed_releases(self):
        """Names (md5 folders) of the software releases of software_root
        that slapgrid completed (``.completed``: never changed after)."""
        try:
            names = os.listdir(self.software_root)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise NodeError('%s: [slapos] software_root %s: %s' % (
                self.config_path, self.software_root, e.strerror or e))
        return sorted(n for n in names if os.path.exists(
            os.path.join(self.software_root, n, '.completed')))

    def computer_address(self):
        """(address, prefix) of the computer's own address, ``[computer]
        address`` of the format definition file (input_definition_file), or
        None when there is none."""
        if not self.definition_file:
            return None
        definition = configparser.RawConfigParser(strict=False)
        try:
            with open(self.definition_file) as f:
                definition.read_file(f, source=self.definition_file)
        except (OSError, configparser.Error) as e:
            raise NodeError('%s: [slapformat] input_definition_file %s: %s'
                            % (self.config_path, self.definition_file,
                               getattr(e, 'strerror', None) or
                               str(e).splitlines()[0]))
        if not definition.has_option('computer', 'address'):
            return None
        text = definition.get('computer', 'address').strip()
        addr, _, mask = text.partition('/')
        try:
            return addr, _prefix(addr, mask)
        except ValueError:
            raise NodeError('%s: [computer] address: expected address/netmask'
                            ' (got %r)' % (self.definition_file, text))

    def device(self, addr):
        """The interface that carries ``addr`` (IPv4 or IPv6)."""
        return self.ipv6_interface if ':' in addr else self.interface

    def ipv6_ranges(self):
        """The IPv6 range of every partition that has one: format routes
        each to the host itself (``ip -6 route add local RANGE dev lo``,
        with net.ipv6.ip_nonlocal_bind) so that programs may use any
        address of it."""
        return [part.ipv6_range for part in self.partitions()
                if part.ipv6_range]

    def addresses(self):
        """[(address, prefix, interface)] of every partition."""
        return [(addr, prefix, self.device(addr))
                for part in self.partitions()
                for addr, prefix in part.addresses]


def load_node(path=None):
    """Read slapos.cfg (default /etc/opt/slapos/slapos.cfg or
    $SLAPOS_CONFIGURATION, as the slapos command does)."""
    path = path or os.environ.get('SLAPOS_CONFIGURATION') or \
        DEFAULT_SLAPOS_CFG
    config = configparser.ConfigParser(interpolation=None)
    try:
        with open(path) as f:
            config.read_file(f, source=path)
    except OSError as e:
        raise NodeError('%s: cannot read: %s' % (path, e.strerror or e))
    except configparser.Error as e:
        raise NodeError('%s: not a slapos.cfg: %s' % (
            path, str(e).splitlines()[0]))
    return Node(path, config)


def _ids(name):
    try:
        entry = pwd.getpwnam(name)
        return [entry.pw_uid, entry.pw_gid]
    except KeyError:
        return None


def release_name(url):
    """The folder of software_root that slapgrid builds ``url`` in."""
    return hashlib.md5(url.encode('utf-8')).hexdigest()


def release_url(folder):
    """The URL of the software release built in ``folder``, from the
    ``buildout.cfg`` that slapgrid writes there (``extends = URL``), or None
    when it cannot be read or does not match the folder's name."""
    parser = configparser.RawConfigParser(strict=False)
    try:
        with open(os.path.join(folder, 'buildout.cfg')) as f:
            parser.read_file(f)
        url = parser.get('buildout', 'extends').strip()
    except (OSError, UnicodeDecodeError, configparser.Error):
        return None
    return url if release_name(url) == os.path.basename(
        os.path.normpath(folder)) else None


def describe_release(name, urls, software_root=None):
    """'URL (folder)' of a software release, as messages name it; the
    folder alone when its URL is unknown."""
    folder = os.path.join(software_root, name) if software_root else name
    url = (urls or {}).get(name)
    return '%s (%s)' % (url, folder) if url else folder


def fingerprint(node):
    """What a standby must have the same, as JSON-able data (the shape is
    in the module's documentation)."""
    users = {node.software_user: _ids(node.software_user)}
    partitions = {}
    for part in node.partitions():
        if part.user:
            users[part.user] = [part.uid, part.gid]
        if part.in_use:
            partitions[part.id] = os.path.basename(part.software_path) \
                if part.software_path else None
    releases = sorted({os.path.relpath(p, node.software_root)
                       for p in node.software_releases()})
    own = node.computer_address()
    return {
        'version': FINGERPRINT_VERSION,
        'computer_id': node.computer_id,
        'instance_root': node.instance_root,
        'software_root': node.software_root,
        'users': users,
        'software_releases': releases,
        'software_urls': {name: release_url(os.path.join(
            node.software_root, name)) for name in releases},
        'partitions': partitions,
        'interfaces': sorted({node.interface, node.ipv6_interface}),
        'computer_address': '%s/%d' % own if own else None,
    }


def local_facts(node, reference):
    """The facts of this host for what ``reference`` names."""
    users = {name: _ids(name) for name in reference.get('users', {})}
    releases = {}
    for rel in reference.get('software_releases', []):
        folder = os.path.join(node.software_root, rel)
        releases[rel] = ('completed' if os.path.exists(
            os.path.join(folder, '.completed')) else
            'present' if os.path.isdir(folder) else 'missing')
    interfaces = {dev: os.path.exists('/proc/sys/net/ipv4/conf/%s' % dev)
                  for dev in reference.get('interfaces', [])}
    return {'instance_root': node.instance_root,
            'software_root': node.software_root, 'users': users,
            'software_releases': releases, 'interfaces': interfaces}


def compare(reference, facts):
    """One line per thing a standby must fix (or wait for) before it may
    take over."""
    problems = []
    for key in ('instance_root', 'software_root'):
        if reference.get(key) != facts.get(key):
            problems.append('%s is %s here but %s on the owner: use the same'
                            ' path' % (key, facts.get(key),
                                       reference.get(key)))
    for user, ids in sorted(reference.get('users', {}).items()):
        mine = facts['users'].get(user)
        if ids is None:
            continue
        if mine is None:
            problems.append('user %s is missing: create it with uid %d and'
                            ' gid %d (as on the owner)' % (user, ids[0],
                                                            ids[1]))
        elif list(mine) != list(ids):
            problems.append('user %s has uid %d gid %d here but uid %d gid'
                            ' %d on the owner: give it the same ids' % (
                                user, mine[0], mine[1], ids[0], ids[1]))
    for rel, state in sorted(facts['software_releases'].items()):
        if state != 'completed':
            problems.append(
                'software release %s is %s here: the owner\'s agent copies'
                ' it to each standby (its status says how far)' % (
                    describe_release(rel, reference.get('software_urls'),
                                     reference.get('software_root')),
                    'missing' if state == 'missing' else
                    'incomplete (no .completed)'))
    for dev, present in sorted(facts['interfaces'].items()):
        if not present:
            problems.append('interface %s for the partition addresses is'
                            ' missing' % dev)
    return problems
