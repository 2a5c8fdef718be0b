"""Configuration of a slaposha cluster: parsed and validated in one place.

Two kinds of ini files, in the style of slapos.cfg:

- the cluster file (``/etc/opt/slaposha/cluster.cfg`` by default): who the
  hosts are, how to reach etcd, the lease timings, the API;
- one file per service (``services/<name>.cfg`` beside it): where it may run,
  how it is orchestrated, and its resources as ``[<kind>#<name>]`` sections.

Every key is declared once below with its type, default and a line of
documentation; ``slaposha config keys`` prints them. Whatever is wrong in a
file becomes one :class:`ConfigError` whose text names the file, the section
and the key, and says what is expected.
"""

import configparser
import math
import os
from collections import OrderedDict

from slaposha.inputs import one_line
from slaposha.resources import check_section, driver_classes
from slaposha.schema import REQUIRED, Key, Section, key_table, parse_name

__all__ = [
    'ConfigError', 'Key', 'load_cluster', 'load_service', 'load_services',
    'resource_kinds', 'DEFAULT_CLUSTER_FILE',
    'CLUSTER_SCHEMA', 'SERVICE_SCHEMA', 'describe_sections',
]

DEFAULT_CLUSTER_FILE = '/etc/opt/slaposha/cluster.cfg'


class ConfigError(Exception):
    """A user's configuration mistake, printed as one line.

    The line reads ``<file>: [<section>] <key>: <what is wrong>``, so that an
    operator can go straight to the place to fix.
    """

    def __init__(self, path, section=None, key=None, message=''):
        self.path = path
        self.section = section
        self.key = key
        self.message = message
        super().__init__(str(self))

    def __str__(self):
        where = []
        if self.section is not None:
            where.append('[%s]' % one_line(self.section, 80))
        if self.key is not None:
            where.append(one_line(self.key, 80))
        # Whatever a driver's check repeats of a value: one line, cut.
        message = one_line(self.message, 500)
        return ': '.join([self.path, ' '.join(where), message]
                         if where else [self.path, message])


# -- the cluster file --------------------------------------------------------

# [lease] profile: the values its keys take when the file does not give
# them ("default" is the keys' own defaults). Both pass _check_lease with
# an election timeout of 500 ms (the [etcd] default) and no more.
LEASE_PROFILES = {
    'default': {},
    'fast': {'ttl': 2, 'renew_interval': 0.4, 'retry_interval': 0.1,
             'request_timeout': 0.3, 'fence_margin': 0.3,
             'kill_margin': 0.1},
}

CLUSTER_SCHEMA = OrderedDict([
    ('cluster', key_table(
        Key('name', 'name', REQUIRED, 'name of the cluster; prefixes its keys'
            ' in etcd, so several clusters can share one etcd'),
        Key('hosts', 'names', REQUIRED, 'hosts that may run services, each'
            ' with a [host <name>] section'),
        Key('witnesses', 'names', [], 'hosts that run only an etcd member'
            ' (`slaposha witness`), to give two hosts a quorum'),
        Key('services_dir', 'path', None, 'folder of the service files'
            ' (default: services/ beside this file)'),
        Key('state_dir', 'path', '/var/lib/slaposha', 'where the agent keeps'
            ' its state and the embedded etcd member its data'),
        Key('run_dir', 'path', '/run/slaposha', 'sockets and pid files of'
            ' the agent and its watchdog'),
        Key('tls', 'boolean', False, 'etcd members and their clients talk'
            ' TLS, each side proving itself with a certificate of the cluster'
            ' CA (files in ssl_dir)'),
        Key('ssl_dir', 'path', None, 'the cluster CA certificate (ca.crt)'
            ' and each host\'s certificate and key (<host>.crt, <host>.key);'
            ' default: ssl/ beside this file'),
    )),
    ('host', key_table(
        Key('address', 'address', REQUIRED, 'address peers and etcd use to'
            ' reach this host'),
    )),
    ('etcd', key_table(
        Key('mode', 'choice', 'embedded', 'embedded: each host and witness'
            ' runs one member, supervised by its agent; external: use the'
            ' members listed in endpoints', choices=['embedded', 'external']),
        Key('endpoints', 'urls', [], 'client URLs of an external etcd'
            ' cluster (mode = external)'),
        Key('binary', 'path', None, 'etcd executable (default: etcd found'
            ' in PATH); 3.5.13 or newer has the lease-safety fixes'),
        Key('client_port', 'integer', 2379, 'client port of embedded members',
            minimum=1, maximum=65535),
        Key('peer_port', 'integer', 2380, 'peer port of embedded members',
            minimum=1, maximum=65535),
        Key('heartbeat_interval', 'duration', 0.05, 'raft heartbeat of'
            ' embedded members (about the round trip between hosts)',
            minimum=0.01),
        Key('election_timeout', 'duration', 0.5, 'raft election timeout'
            ' (about 10 heartbeats); also the figure used to check the lease'
            ' timings against an external cluster', minimum=0.05),
        Key('prefix', 'prefix', '/slaposha', 'key prefix of the cluster in'
            ' etcd', max_length=255),
        Key('leader_placement', 'choice', 'away', 'away: an agent that owns'
            ' services hands the raft leadership of embedded members to a'
            ' witness or a host that owns none, so that losing a service'
            ' host never also costs an etcd election (about 1.5 s more'
            ' takeover); any: leave it where raft puts it',
            choices=['away', 'any']),
    )),
    ('lease', key_table(
        Key('profile', 'choice', 'default', 'a set of the timings below:'
            ' default (ttl 3, renew_interval 500ms, retry_interval 200ms,'
            ' request_timeout 500ms, fence_margin 500ms, kill_margin 200ms)'
            ' or fast (ttl 2, renew_interval 400ms, retry_interval 100ms,'
            ' request_timeout 300ms, fence_margin 300ms, kill_margin 100ms:'
            ' a takeover about 0.7 s sooner, with'
            ' the same room for one etcd election of 2 x election_timeout);'
            ' a key given in this section overrides its profile',
            choices=sorted(LEASE_PROFILES)),
        Key('ttl', 'integer', 3, 'seconds an owner keeps a service without'
            ' renewing its lease (etcd counts whole seconds)', minimum=1),
        Key('renew_interval', 'duration', 0.5, 'time between two renewals of'
            ' a held lease', minimum=0.05),
        Key('retry_interval', 'duration', 0.2, 'after a failed renewal, time'
            ' between two renewals sent to every etcd endpoint at once, each'
            ' on a new connection (other requests: the pause after every'
            ' endpoint failed)', minimum=0.01),
        Key('request_timeout', 'duration', 0.5, 'time allowed to one etcd'
            ' request', minimum=0.01),
        Key('fence_margin', 'duration', 0.5, 'an owner whose renewals fail'
            ' suspends its services (processes frozen, addresses dropped)'
            ' this long before its lease can expire in etcd, and resumes them'
            ' if a renewal is answered before kill_margin', minimum=0.1),
        Key('kill_margin', 'duration', 0.2, 'an owner whose renewals failed'
            ' kills its suspended services this long before its lease can'
            ' expire in etcd: covers killing the frozen processes and'
            ' clock-rate drift; at most fence_margin', minimum=0.05),
    )),
    ('agent', key_table(
        Key('loop_interval', 'duration', 0.1, 'how often the agent decides'
            ' what to start or stop while it must look often (no lease yet,'
            ' etcd out of reach, a service here with work on a schedule:'
            ' replication, tasks); otherwise it decides when its etcd watch'
            ' sees a change, and for its timed checks',
            minimum=0.01, maximum=5.0),
        Key('resync_interval', 'duration', 10.0, 'the agent follows the'
            ' cluster with an etcd watch; this often it also reads every host'
            ' and service key again and watches anew, a safety net',
            minimum=1.0),
        Key('monitor_interval', 'duration', 2.0, 'how often an owner checks'
            ' the status of its services\' resources', minimum=0.1),
        Key('startup_grace', 'duration', 5.0, 'after its agent starts, a'
            ' host leaves a free service this long to a more preferred host'
            ' that has not joined yet, so that a cluster starting up puts'
            ' each service on its preferred host', minimum=0.0),
        Key('failed_hold', 'duration', 60.0, 'how long a host that failed to'
            ' run a service leaves it to the other hosts', minimum=0.0),
        Key('history_kept', 'integer', 50, 'takeovers and switches of each'
            ' service kept in etcd for the status page and `slaposha mon`',
            minimum=1, maximum=10000),
    )),
    ('api', key_table(
        Key('port', 'integer', 1215, 'HTTPS port of the agent API',
            minimum=1, maximum=65535),
        Key('listen', 'address', None, 'address the API listens on'
            ' (default: the host address)'),
        Key('health_port', 'integer', None, 'plain-HTTP port for load'
            ' balancers\' health checks (/health/owner/<service>,'
            ' /health/standby/<service>: 200 or 503 and one line, nothing'
            ' else); off when unset', minimum=1, maximum=65535),
        Key('health_listen', 'address', None, 'address the health port'
            ' listens on (default: the host address)'),
        Key('max_connections', 'integer', 64, 'connections the API (and'
            ' the health port) serve at once; beyond, a new one is closed'
            ' at once', minimum=1, maximum=10000),
        Key('max_client_connections', 'integer', 8, 'connections one client'
            ' may hold at once: counted by address until its TLS handshake'
            ' ends, then by certificate (beyond: 429), so that one client'
            ' never takes every connection from the others', minimum=1,
            maximum=10000),
        Key('request_timeout', 'duration', 10.0, 'time a client has to send'
            ' its whole request (TLS handshake, request line, headers,'
            ' body), however it trickles; past it, 408 and the connection'
            ' is closed', minimum=0.1, maximum=3600),
    )),
    ('replication', key_table(
        Key('max_connections', 'integer', 128, 'connections a host\'s'
            ' replication receivers (btrfs, rsync, copies) serve at once;'
            ' beyond, a new one is closed at once', minimum=1,
            maximum=10000),
        Key('max_peer_connections', 'integer', 32, 'connections one address'
            ' may hold on a receiver at once (an owner sends each of its'
            ' services\' volumes and trees on a connection of its own), so'
            ' that one peer never takes every connection from the others',
            minimum=1, maximum=10000),
    )),
])

# Sections that appear once per named thing: "[host hA]".
_NAMED_SECTIONS = ('host',)


def _parse_ini(path):
    """Read an ini file, turning every read or syntax error into one line."""
    parser = configparser.ConfigParser(
        interpolation=None, strict=True, empty_lines_in_values=False,
        default_section='\0no default section\0')
    parser.optionxform = str  # keys are case sensitive, as in slapos.cfg
    try:
        with open(path) as f:
            parser.read_file(f, source=path)
    except OSError as e:
        raise ConfigError(path, message='cannot read: %s'
                          % (e.strerror or e))
    except UnicodeDecodeError as e:
        raise ConfigError(path, message='not UTF-8 text: %s' % e.reason)
    except configparser.DuplicateSectionError as e:
        raise ConfigError(path, e.section, message='section appears twice'
                          ' (line %s)' % e.lineno)
    except configparser.DuplicateOptionError as e:
        raise ConfigError(path, e.section, e.option, 'key appears twice in'
                          ' this section (line %s)' % e.lineno)
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError(path, message='line %s is outside any [section]'
                          % e.lineno)
    except configparser.ParsingError as e:
        lines = ', '.join(str(n) for n, _ in e.errors)
        raise ConfigError(path, message='cannot parse line %s (expected'
                          ' "key = value" or "[section]")' % lines)
    return parser


def _parse_section(path, section, raw, keys):
    values = {}
    for name, text in raw.items():
        if name not in keys:
            raise ConfigError(path, section, name, 'unknown key (known: %s)'
                              % ', '.join(keys))
        try:
            values[name] = keys[name].parse(text)
        except ValueError as e:
            raise ConfigError(path, section, name, str(e))
    for name, key in keys.items():
        if name in values:
            continue
        if key.required:
            raise ConfigError(path, section, name, 'required key is missing')
        values[name] = list(key.default) if isinstance(key.default, list) \
            else key.default
    return Section(section, values)


class ClusterConfig(object):
    """A validated cluster file: ``cluster``, ``etcd``, ``lease``, ``api``
    and ``replication`` sections as attributes, ``hosts`` as a dict of name to Section."""

    def __init__(self, path, sections, hosts):
        self.path = path
        self.__dict__.update(sections)
        self.hosts = hosts

    @property
    def name(self):
        return self.cluster.name

    @property
    def members(self):
        """Every host that runs an etcd member: hosts, then witnesses."""
        return self.cluster.hosts + self.cluster.witnesses

    @property
    def services_dir(self):
        return self.cluster.services_dir or os.path.join(
            os.path.dirname(os.path.abspath(self.path)), 'services')

    @property
    def ssl_dir(self):
        return self.cluster.ssl_dir or os.path.join(
            os.path.dirname(os.path.abspath(self.path)), 'ssl')

    def tls_files(self, host):
        """(ca, cert, key) of ``host`` when the cluster uses TLS, else None.
        Raises ConfigError naming a file that is missing."""
        if not self.cluster.tls:
            return None
        files = tuple(os.path.join(self.ssl_dir, name) for name in
                      ('ca.crt', host + '.crt', host + '.key'))
        for path in files:
            if not os.access(path, os.R_OK):
                raise ConfigError(self.path, 'cluster', 'tls', 'tls = true'
                                  ' but %s is missing or unreadable' % path)
        return files

    def check_ssl_dir(self):
        """With ``tls = true``, ConfigError unless the ssl folder has the
        cluster CA (a host's own files are checked when its agent starts;
        ``slaposha cluster init`` and ``join`` make them)."""
        if not self.cluster.tls:
            return
        if not os.path.isdir(self.ssl_dir):
            raise ConfigError(self.path, 'cluster', 'tls', 'tls = true but %s'
                              ' does not exist (ssl_dir; `slaposha cluster'
                              ' init` or `join` makes it)' % self.ssl_dir)
        ca = os.path.join(self.ssl_dir, 'ca.crt')
        if not os.access(ca, os.R_OK):
            raise ConfigError(self.path, 'cluster', 'tls', 'tls = true but %s'
                              ' is missing or unreadable' % ca)

    def etcd_endpoints(self):
        """Client URLs of the etcd members, in the order to try them."""
        if self.etcd.mode == 'external':
            return list(self.etcd.endpoints)
        scheme = 'https' if self.cluster.tls else 'http'
        return ['%s://%s:%d' % (scheme, _url_host(self.hosts[h].address),
                                self.etcd.client_port)
                for h in self.members]


def _url_host(address):
    return '[%s]' % address if ':' in address else address


def load_cluster(path=None):
    """Parse and validate a cluster file; raise ConfigError on any mistake."""
    path = path or os.environ.get('SLAPOSHA_CONFIG') or DEFAULT_CLUSTER_FILE
    parser = _parse_ini(path)
    sections = {}
    hosts = OrderedDict()
    for section in parser.sections():
        kind, _, name = section.partition(' ')
        name = name.strip()
        if kind in _NAMED_SECTIONS:
            try:
                name = parse_name(name)
            except ValueError as e:
                raise ConfigError(path, section, message='section name: %s'
                                  % e)
            hosts[name] = _parse_section(path, section,
                                         dict(parser[section]),
                                         CLUSTER_SCHEMA[kind])
        elif kind in CLUSTER_SCHEMA and not name:
            sections[kind] = _parse_section(path, section,
                                            dict(parser[section]),
                                            CLUSTER_SCHEMA[kind])
            if kind == 'lease':
                _apply_profile(sections[kind], parser[section])
        else:
            known = ['[%s]' % s for s in CLUSTER_SCHEMA
                     if s not in _NAMED_SECTIONS]
            known += ['[%s <name>]' % s for s in _NAMED_SECTIONS]
            raise ConfigError(path, section, message='unknown section'
                              ' (known: %s)' % ', '.join(known))
    if 'cluster' not in sections:
        raise ConfigError(path, 'cluster', message='required section is'
                          ' missing')
    for kind, keys in CLUSTER_SCHEMA.items():
        if kind not in sections and kind not in _NAMED_SECTIONS:
            sections[kind] = _parse_section(path, kind, {}, keys)
    config = ClusterConfig(path, sections, hosts)
    _check_cluster(config)
    return config


def _apply_profile(lease, given):
    for name, value in LEASE_PROFILES[lease.profile].items():
        if name not in given:
            setattr(lease, name, value)
    # A fence_margin set below the kill_margin it did not set: no
    # suspension, killed at the fence_margin as before.
    if 'kill_margin' not in given:
        lease.kill_margin = min(lease.kill_margin, lease.fence_margin)


def _check_cluster(config):
    """Relations between keys: what each key alone cannot say."""
    path = config.path
    cluster = config.cluster
    if not cluster.hosts:
        raise ConfigError(path, 'cluster', 'hosts', 'empty: name at least one'
                          ' host that may run services')
    seen = set()
    for name in config.members:
        if name in seen:
            raise ConfigError(path, 'cluster', 'witnesses' if name in
                              cluster.witnesses else 'hosts',
                              'host %r is listed twice' % name)
        seen.add(name)
    for name in config.members:
        if name not in config.hosts:
            raise ConfigError(path, 'host %s' % name, 'address',
                              'host %r is listed in [cluster] but has no'
                              ' [host %s] section with its address'
                              % (name, name))
    if config.etcd.mode == 'embedded':
        if len(config.members) == 2:
            raise ConfigError(path, 'cluster', 'witnesses', 'two etcd members'
                              ' lose quorum when either fails: add a witness'
                              ' host (or a third host)')
    else:
        if not config.etcd.endpoints:
            raise ConfigError(path, 'etcd', 'endpoints', 'mode = external'
                              ' needs the client URLs of the etcd cluster')
        if cluster.witnesses:
            raise ConfigError(path, 'cluster', 'witnesses', 'a witness only'
                              ' runs an etcd member: with mode = external'
                              ' there is nothing for it to run')
    for name in config.hosts:
        if name not in seen:
            raise ConfigError(path, 'host %s' % name, message='host is not'
                              ' listed in [cluster] hosts or witnesses')
    if config.api.max_client_connections > config.api.max_connections:
        raise ConfigError(path, 'api', 'max_client_connections', 'must be at'
                          ' most max_connections (%d)'
                          % config.api.max_connections)
    if config.replication.max_peer_connections > \
            config.replication.max_connections:
        raise ConfigError(path, 'replication', 'max_peer_connections', 'must'
                          ' be at most max_connections (%d)'
                          % config.replication.max_connections)
    _check_lease(config)


def _check_lease(config):
    """Reject lease timings that would let an owner lose its lease unseen or
    fence itself on every hiccup (DESIGN.md 2)."""
    path, lease, etcd = config.path, config.lease, config.etcd
    if lease.fence_margin >= lease.ttl:
        raise ConfigError(path, 'lease', 'fence_margin', 'must be below ttl'
                          ' (%s s), or the owner fences before it starts'
                          % lease.ttl)
    if lease.kill_margin > lease.fence_margin:
        raise ConfigError(path, 'lease', 'kill_margin', 'must not exceed'
                          ' fence_margin (%g s): services are suspended at'
                          ' fence_margin and killed at kill_margin before the'
                          ' lease can expire' % lease.fence_margin)
    if lease.request_timeout > lease.renew_interval:
        raise ConfigError(path, 'lease', 'request_timeout', 'must not exceed'
                          ' renew_interval (%g s): a renewal must end before'
                          ' the next one is due' % lease.renew_interval)
    if lease.retry_interval >= lease.renew_interval:
        raise ConfigError(path, 'lease', 'retry_interval', 'must be below'
                          ' renew_interval (%g s)' % lease.renew_interval)
    # One renewal may be lost: the next one, sent renew_interval later, must
    # still answer before the self-fence deadline.
    budget = (2 * lease.renew_interval + lease.request_timeout
              + lease.fence_margin)
    if budget > lease.ttl + 1e-9:
        raise ConfigError(path, 'lease', 'renew_interval', 'too close to ttl:'
                          ' 2 x renew_interval + request_timeout +'
                          ' fence_margin = %g s must not exceed ttl (%s s),'
                          ' so that one lost renewal does not stop the'
                          ' services' % (budget, lease.ttl))
    # etcd raises any TTL below 1.5 election timeouts: the agent would then
    # believe in a shorter lease than etcd grants.
    floor = math.ceil(1.5 * etcd.election_timeout)
    if config.etcd.mode == 'embedded' and lease.ttl < floor:
        raise ConfigError(path, 'lease', 'ttl', 'etcd grants no lease shorter'
                          ' than 1.5 x election_timeout: use at least %d'
                          % floor)
    # An election (about 2 election timeouts: reference/coordination.md A.4)
    # may swallow a renewal that was due: the next one must still answer
    # before the deadline, or every owner fences at each leader change.
    needs = (2 * etcd.election_timeout + lease.request_timeout
             + lease.renew_interval + lease.fence_margin)
    if needs > lease.ttl + 1e-9:
        raise ConfigError(path, 'lease', 'ttl', 'too short for an etcd'
                          ' election: 2 x election_timeout + request_timeout'
                          ' + renew_interval + fence_margin = %g s must not'
                          ' exceed ttl (%s s)' % (needs, lease.ttl))


# -- service files -----------------------------------------------------------

SERVICE_SCHEMA = key_table(
    Key('hosts', 'names', None, 'hosts the service may run on, most'
        ' preferred first (default: every host of the cluster)'),
    Key('orchestrate', 'choice', 'ha', 'ha: the agents start it on the'
        ' preferred live host and take it over when its owner is lost;'
        ' manual: only operators start, stop and move it',
        choices=['ha', 'manual']),
    Key('restart', 'integer', 0, 'times a failed resource is restarted in'
        ' place before on_failure applies', minimum=0),
    Key('on_failure', 'choice', 'switch', 'what follows a resource that'
        ' keeps failing: switch to the next host, stop, or freeze',
        choices=['switch', 'stop', 'freeze']),
    Key('max_lag', 'duration', None, 'a standby whose data is older than'
        ' this does not take over by itself'),
    Key('start_timeout', 'duration', 300.0, 'time allowed to start the'
        ' whole service (a big SlapOS node starts partition after'
        ' partition); a start still going on then is undone and on_failure'
        ' applies', minimum=0.1),
    Key('stop_timeout', 'duration', 120.0, 'time allowed to stop the whole'
        ' service (the stops of its resources, a last copy of its data'
        ' included); what still stops then is killed', minimum=0.1),
    Key('exclusive', 'names', [], 'services that share one of these names'
        ' never run on one host at once (every SlapOS node service:'
        ' exclusive = slapos-node); a host running one is skipped when'
        ' another is placed'),
)

# Keys every resource section has, whatever its kind.
RESOURCE_COMMON = key_table(
    Key('disable', 'boolean', False, 'skip this resource'),
    Key('optional', 'boolean', False, 'a failure of this resource does not'
        ' fail the service; status shows it as warn'),
)


def resource_kinds():
    """{kind: {name: Key}}: the keys every resource section has, then
    those its driver declares (:mod:`slaposha.resources`)."""
    kinds = OrderedDict()
    for kind, cls in driver_classes().items():
        kinds[kind] = merged = OrderedDict(RESOURCE_COMMON)
        for key in cls.keys:
            merged[key.name] = key
    return kinds


class ServiceConfig(object):
    """A validated service file: ``service`` settings and the ordered list of
    ``resources``, each a Section with ``kind`` and ``rid`` (``ip#public``)."""

    def __init__(self, path, name, service, resources):
        self.path = path
        self.name = name
        self.service = service
        self.resources = resources


def service_name(path):
    return os.path.splitext(os.path.basename(path))[0]


def load_service(path, cluster=None):
    """Parse and validate one service file; its name is the file's stem."""
    try:
        name = parse_name(service_name(path))
    except ValueError as e:
        raise ConfigError(path, message='service name from the file name: %s'
                          % e)
    # The drivers declare their keys and check their sections.
    kinds = resource_kinds()
    parser = _parse_ini(path)
    service = None
    resources = []
    for section in parser.sections():
        raw = dict(parser[section])
        if section == 'service':
            service = _parse_section(path, section, raw, SERVICE_SCHEMA)
            continue
        kind, sep, rname = section.partition('#')
        if not sep:
            raise ConfigError(path, section, message='unknown section'
                              ' (expected [service] or [<kind>#<name>],'
                              ' e.g. [ip#public])')
        if kind not in kinds:
            raise ConfigError(path, section, message='unknown resource kind'
                              ' %r (known: %s)' % (
                                  kind, ', '.join(kinds) or 'none'))
        try:
            parse_name(rname)
        except ValueError as e:
            raise ConfigError(path, section, message='resource name: %s' % e)
        res = _parse_section(path, section, raw, kinds[kind])
        res.kind = kind
        res.rid = section
        res._service_file = path  # an export task runs `slaposha export` on it
        problem = check_section(res)
        if problem:
            raise ConfigError(path, section, message=problem)
        resources.append(res)
    if service is None:
        service = _parse_section(path, 'service', {}, SERVICE_SCHEMA)
    if service.hosts is not None:
        _check_service_hosts(path, service.hosts)
    if cluster is not None:
        if service.hosts is None:
            service.hosts = list(cluster.cluster.hosts)
        for host in service.hosts:
            if host not in cluster.cluster.hosts:
                raise ConfigError(path, 'service', 'hosts', 'host %r is not'
                                  ' one of the cluster hosts (%s)' % (
                                      host, ', '.join(cluster.cluster.hosts)))
    return ServiceConfig(path, name, service, resources)


def _check_service_hosts(path, hosts):
    if not hosts:
        raise ConfigError(path, 'service', 'hosts', 'empty: the service could'
                          ' run nowhere (without the key: every host of the'
                          ' cluster)')
    for i, host in enumerate(hosts):
        if host in hosts[:i]:
            raise ConfigError(path, 'service', 'hosts', 'host %r is listed'
                              ' twice' % host)


def load_services(cluster, broken=None):
    """Every ``*.cfg`` of the cluster's services folder, sorted by name.
    ``broken``: a dict that takes {service: one-line error} of the files
    that do not load, instead of raising (an agent runs the others)."""
    folder = cluster.services_dir
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith('.cfg'))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(folder, message='cannot read the services folder:'
                          ' %s' % (e.strerror or e))
    services = []
    for n in names:
        try:
            services.append(load_service(os.path.join(folder, n), cluster))
        except ConfigError as e:
            if broken is None:
                raise
            broken[n[:-len('.cfg')]] = str(e)
    from slaposha.placement import collisions
    found = collisions(services)
    if found:
        a, b, host, path = found
        raise ConfigError(b.path, 'service', 'exclusive', '%s and %s may both'
                          ' run on %s and both use %s there: give them a'
                          ' common exclusive name (e.g. exclusive ='
                          ' slapos-node) or different paths' % (
                              a.name, b.name, host, path))
    return services


def describe_sections(schema, named=()):
    """The lines of ``schema`` ({section: keys}): a title per section
    (``[<section> <name>]`` for those in ``named``), a line per key."""
    lines = []
    for section, keys in schema.items():
        lines.append('[%s <name>]' % section if section in named
                     else '[%s]' % section)
        lines.extend('  ' + k.describe() for k in keys.values())
    return lines


def describe_schema():
    """Every key of both files, one per line, for ``slaposha config keys``:
    the cluster file's, the service file's and every resource kind's."""
    lines = ['# cluster file'] + describe_sections(CLUSTER_SCHEMA,
                                                   _NAMED_SECTIONS)
    lines.append('# service file')
    lines.append('[service]')
    lines.extend('  ' + k.describe() for k in SERVICE_SCHEMA.values())
    classes = driver_classes()
    for kind, keys in resource_kinds().items():
        doc = (classes[kind].__doc__ or '').split('\n')[0]
        lines.append('[%s#<name>]%s' % (kind, '  ' + doc if doc else ''))
        lines.extend('  ' + k.describe() for k in keys.values())
    return '\n'.join(lines)
