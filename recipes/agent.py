"""``slaposha:agent`` and ``slaposha:witness``: one host's cluster file from
buildout options, validated by slaposha.config as ``slaposha config check``
would, and the partition's service wrapper that runs the agent (or the
witness).

Options, all strings as buildout and a SlapOS master give them:

``cluster-name``
    the cluster's name.
``hosts``, ``witnesses``
    ``name=address`` pairs (separated by spaces, commas or new lines), the
    hosts most preferred first.
``host``
    the name of the host this partition is on: one of ``hosts`` for an
    agent, of ``witnesses`` for a witness.
``service-name``, ``service``
    (agent) one service file: its name (default ``node``) and its ini text.
``<setting>``
    any other key of the cluster file (``slaposha config keys``): the keys
    of [cluster] by their name with dashes (``state-dir``, ``run-dir``,
    ``tls``, ``ssl-dir``), the others prefixed with their section
    (``lease-ttl``, ``etcd-mode``, ``api-port``, ``agent-loop-interval``).
``config-file``
    where the cluster file goes (default: etc/slaposha/cluster.cfg in the
    buildout directory); the service file goes to services/ beside it.
``wrapper-path``, ``slaposha``
    the service wrapper to write (e.g. in the partition's etc/service) and
    the slaposha executable it runs.
``parameters-from``
    a section (``slaposha:slap-configuration``) whose ``configuration.<o>``
    gives option ``<o>`` when this section does not: every key of the
    cluster file is then an instance parameter, with no list to keep.

The recipe sets ``config-file`` and ``api-url`` (agent) or ``etcd-url``
(witness), for the sections that publish them.
"""

import os
import re
from collections import OrderedDict

__all__ = ['Recipe', 'WitnessRecipe', 'option_name']

# Options that are not a key of the cluster file.
OWN_OPTIONS = ('recipe', 'cluster-name', 'hosts', 'witnesses', 'host',
               'config-file', 'wrapper-path', 'slaposha', 'parameters-from')
SERVICE_OPTIONS = ('service-name', 'service')
SET_BY_RECIPE = ('api-url', 'etcd-url')
# What parameters-from may give, besides the keys of the cluster file.
PARAMETERS = ('cluster-name', 'hosts', 'witnesses', 'host') + SERVICE_OPTIONS


def option_name(section, key):
    """The option that sets ``key`` of ``[section]``."""
    dashed = key.replace('_', '-')
    return dashed if section == 'cluster' else '%s-%s' % (section, dashed)


def _settings():
    """{option: (section, key)} of every cluster key an option may set."""
    from slaposha.config import CLUSTER_SCHEMA
    found = OrderedDict()
    for section, keys in CLUSTER_SCHEMA.items():
        if section == 'host':
            continue
        for key in keys:
            if section == 'cluster' and key in ('name', 'hosts', 'witnesses'):
                continue
            found[option_name(section, key)] = (section, key)
    return found


def fail(part, option, message):
    """Stop the buildout with one line naming the option."""
    import zc.buildout
    raise zc.buildout.UserError('[%s] %s: %s' % (part, option, message))


def _pairs(part, option, text):
    pairs = OrderedDict()
    for word in re.split(r'[\s,]+', text.strip()):
        if not word:
            continue
        name, sep, address = word.partition('=')
        if not (sep and name and address):
            fail(part, option, 'expected name=address pairs such as'
                 ' hA=10.0.0.1 (got %r)' % word)
        if name in pairs:
            fail(part, option, 'host %r is listed twice' % name)
        pairs[name] = address
    return pairs


class Recipe(object):
    """The agent of one host: cluster file, service file, wrapper."""

    role = 'agent'
    command = 'agent'

    def __init__(self, buildout, name, options):
        self.buildout = buildout
        self.name = name
        self.options = options
        options.setdefault('config-file', os.path.join(
            buildout['buildout']['directory'], 'etc', 'slaposha',
            'cluster.cfg'))
        self.cluster = self._validate()
        self._publishable()

    # -- options -> files -----------------------------------------------------

    def _known(self):
        known = OWN_OPTIONS + SET_BY_RECIPE + tuple(self.settings)
        if self.role == 'agent':
            known += SERVICE_OPTIONS
        return known

    def _read(self):
        opts = self.options
        self.settings = _settings()
        known = self._known()
        for option in list(opts.keys()):
            # An empty option is no value: a witness may inherit (<=) the
            # agent's section with its service options emptied.
            if option not in known and not option.startswith('_') and \
                    opts[option].strip():
                fail(self.name, option, 'unknown option (known: %s)'
                     % ', '.join(o for o in known if o != 'recipe'))
        source = opts.get('parameters-from', '').strip()
        if source:
            # Copied into this section: a changed parameter changes the
            # part, and buildout reinstalls it.
            given = self.buildout[source]
            # Not the files nor the executable: only what the cluster is.
            for option in [o for o in known if o in PARAMETERS or
                           o in self.settings]:
                if option not in opts and 'configuration.' + option in given:
                    opts[option] = given['configuration.' + option]
        for option in ('cluster-name', 'hosts', 'host'):
            if not opts.get(option, '').strip():
                fail(self.name, option, 'required option is missing')
        self.hosts = _pairs(self.name, 'hosts', opts['hosts'])
        self.witnesses = _pairs(self.name, 'witnesses',
                                opts.get('witnesses', ''))
        self.host = opts['host'].strip()
        allowed = self.hosts if self.role == 'agent' else self.witnesses
        if self.host not in allowed:
            fail(self.name, 'host', '%r is not one of the %s (%s)' % (
                self.host, 'hosts' if self.role == 'agent' else 'witnesses',
                ' '.join(allowed) or 'none'))
        if opts.get('wrapper-path') and not opts.get('slaposha'):
            fail(self.name, 'slaposha', 'wrapper-path needs the path of the'
                 ' slaposha executable the wrapper runs')
        self.service = opts.get('service', '').strip()
        self.service_name = opts.get('service-name', '').strip() or 'node'

    def cluster_text(self):
        """The cluster file, from the options."""
        from slaposha.config import CLUSTER_SCHEMA
        by_section = OrderedDict((s, []) for s in CLUSTER_SCHEMA)
        for option, (section, key) in self.settings.items():
            value = self.options.get(option, '').strip()
            if not value:
                continue
            if '\n' in value:
                fail(self.name, option, 'expected one line (got %r)' % value)
            by_section[section].append('%s = %s' % (key, value))
        lines = ['# Written by buildout part [%s] (slaposha:%s): change the'
                 ' instance parameters, not this file.' % (
                     self.name, self.role),
                 '[cluster]', 'name = %s' % self.options['cluster-name'],
                 'hosts = %s' % ' '.join(self.hosts)]
        if self.witnesses:
            lines.append('witnesses = %s' % ' '.join(self.witnesses))
        lines += by_section.pop('cluster')
        for host, address in list(self.hosts.items()) + list(
                self.witnesses.items()):
            lines += ['[host %s]' % host, 'address = %s' % address]
        by_section.pop('host')
        for section, entries in by_section.items():
            if entries:
                lines += ['[%s]' % section] + entries
        return '\n'.join(lines) + '\n'

    def _option_of(self, error):
        """The option behind a ConfigError of the generated files."""
        section, key = error.section, error.key
        if section is None:
            return 'cluster-name'
        kind, _, host = section.partition(' ')
        if kind == 'host':
            return 'witnesses' if host in self.witnesses else 'hosts'
        if section == 'cluster' and key == 'name':
            return 'cluster-name'
        if section == 'cluster' and key in ('hosts', 'witnesses'):
            return key
        return option_name(section, key or '')

    def _validate(self):
        """Check the files in a scratch folder with slaposha.config itself:
        what the agent will read is what passed here."""
        import tempfile
        from slaposha import config
        self._read()
        self.text = self.cluster_text()
        with tempfile.TemporaryDirectory() as scratch:
            path = os.path.join(scratch, 'cluster.cfg')
            with open(path, 'w') as f:
                f.write(self.text)
            try:
                cluster = config.load_cluster(path)
            except config.ConfigError as e:
                fail(self.name, self._option_of(e), e.message)
            if self.role == 'agent' and self.service:
                path = os.path.join(scratch, self.service_name + '.cfg')
                with open(path, 'w') as f:
                    f.write(self.service + '\n')
                try:
                    config.load_service(path, cluster)
                except config.ConfigError as e:
                    if e.section is None:
                        fail(self.name, 'service-name', e.message)
                    where = '[%s]%s' % (e.section, ' %s' % e.key
                                        if e.key else '')
                    fail(self.name, 'service', '%s: %s' % (where, e.message))
        if self.role == 'witness' and cluster.etcd.mode != 'embedded':
            fail(self.name, 'etcd-mode', 'a witness runs an embedded etcd'
                 ' member: expected embedded (got %s)' % cluster.etcd.mode)
        return cluster

    def _publishable(self):
        from slaposha.api.client import url_for
        self.options['api-url'] = url_for(self.cluster, self.host)

    # -- buildout ---------------------------------------------------------------

    def services_dir(self):
        value = self.options.get('services-dir', '').strip()
        return value or os.path.join(
            os.path.dirname(self.options['config-file']), 'services')

    def install(self):
        written = []
        path = self.options['config-file']
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write(path, self.text)
        written.append(path)
        if self.role == 'agent':
            folder = self.services_dir()
            os.makedirs(folder, exist_ok=True)
            if self.service:
                path = os.path.join(folder, self.service_name + '.cfg')
                _write(path, self.service + '\n')
                written.append(path)
        wrapper = self.options.get('wrapper-path', '').strip()
        if wrapper:
            os.makedirs(os.path.dirname(wrapper), exist_ok=True)
            _write(wrapper, self.wrapper_text(), mode=0o755)
            written.append(wrapper)
        return written

    update = install

    def wrapper_text(self):
        from shlex import quote
        return '\n'.join([
            '#!/bin/sh',
            '# The slaposha %s of host %s (cluster %s), run by the'
            ' partition\'s' % (self.role, self.host,
                               self.options['cluster-name']),
            '# supervisord; written by buildout part [%s].' % self.name,
            '# supervisord gives an empty environment: etcd, ip and the'
            ' drivers\' tools are found in the usual places.',
            'PATH=${PATH:-/usr/local/bin:/usr/bin:/bin}:/usr/sbin:/sbin',
            'export PATH',
            'exec %s -c %s %s --host %s' % (
                quote(self.options['slaposha']),
                quote(self.options['config-file']), self.command,
                quote(self.host)),
            ''])


class WitnessRecipe(Recipe):
    """A witness host: the cluster file and a wrapper that runs only its
    etcd member (``slaposha witness``)."""

    role = 'witness'
    command = 'witness'

    def _publishable(self):
        members = self.cluster.members
        self.options['etcd-url'] = self.cluster.etcd_endpoints()[
            members.index(self.host)]


def _write(path, text, mode=0o644):
    """Write ``text`` whole or not at all (a reader never sees half)."""
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# -- the instance parameters, for software/slaposha's JSON schemas -----------

# Set by the instance profile itself, whatever the parameters say.
PROFILE_FIXED = ('state-dir', 'run-dir', 'services-dir')


def _shown(spec, value):
    """A key's value as a parameter gives it."""
    if isinstance(value, list):
        return ' '.join(value)
    if spec.type == 'duration':
        return '%gs' % value
    return value


def parameter_schema(role):
    """The JSON schema of the instance parameters of software type
    ``default`` (role ``agent``) or ``witness``: built from slaposha.config's
    keys (software/slaposha/README.rst says how to write the files again; a
    test checks that each of their parameters is one the recipe takes)."""
    from slaposha.config import CLUSTER_SCHEMA, LEASE_PROFILES, REQUIRED
    profiled = set(k for values in LEASE_PROFILES.values() for k in values)
    pairs = ('name=address pairs separated by spaces, e.g. "hA=10.0.0.1'
             ' hB=10.0.0.2"')
    props = OrderedDict([
        ('cluster-name', {'title': 'Cluster name', 'type': 'string',
                          'description': CLUSTER_SCHEMA['cluster']['name']
                          .doc}),
        ('hosts', {'title': 'Hosts', 'type': 'string', 'description':
                   'hosts that may run services, most preferred first: '
                   + pairs}),
        ('witnesses', {'title': 'Witnesses', 'type': 'string',
                       'description': 'hosts that run only an etcd member,'
                       ' to give two hosts a quorum: ' + pairs,
                       'default': ''}),
        ('host', {'title': 'This host', 'type': 'string', 'description':
                  'the name of the host this instance runs on (one of %s)'
                  % ('hosts' if role == 'agent' else 'witnesses')}),
    ])
    if role == 'agent':
        props['service-name'] = {
            'title': 'Service name', 'type': 'string', 'default': 'node',
            'description': 'name of the service the cluster runs'}
        props['service'] = {
            'title': 'Service', 'type': 'string', 'default': '',
            'description': 'the service file: [service] and its resources'
            ' as [<kind>#<name>] sections (slaposha config keys)'}
    kinds = {'integer': 'integer', 'boolean': 'boolean'}
    for option, (section, key) in _settings().items():
        if option in PROFILE_FIXED:
            continue
        spec = CLUSTER_SCHEMA[section][key]
        prop = {'title': '[%s] %s' % (section, key),
                'type': kinds.get(spec.type, 'string'),
                'description': spec.doc}
        if spec.choices:
            prop['enum'] = list(spec.choices)
        if spec.default not in (None, REQUIRED):
            if section == 'lease' and key in profiled:
                # No default of its own: a form that fills defaults in
                # would override the profile chosen.
                prop['description'] += "; default: the profile's (%s)" % (
                    ', '.join('%s with %s' % (_shown(spec, values.get(
                        key, spec.default)), name)
                        for name, values in sorted(LEASE_PROFILES.items())))
            else:
                prop['default'] = _shown(spec, spec.default)
        props[option] = prop
    return OrderedDict([
        ('$schema', 'http://json-schema.org/draft-07/schema#'),
        ('title', 'slaposha %s' % role),
        ('description', 'Parameters of a slaposha %s: the cluster file of'
         ' one host (slaposha config keys).' % role),
        ('type', 'object'),
        ('required', ['cluster-name', 'hosts', 'host']),
        ('properties', props)])
