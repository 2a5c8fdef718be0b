"""The config layer: good files load; every mistake is one line naming the
file, section and key, and the CLI exits non-zero without a traceback."""

import os
import subprocess
import textwrap

import pytest

from slaposha import config, resources
from slaposha.config import ConfigError
from slaposha.schema import REQUIRED, Key

from conftest import EXAMPLES

GOOD = """\
[cluster]
name = c1
hosts = hA hB
witnesses = hW
[host hA]
address = 10.0.0.1
[host hB]
address = 10.0.0.2
[host hW]
address = fd00::3
"""


def write(tmp_path, text, name='cluster.cfg'):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def error_of(path, loader=config.load_cluster):
    with pytest.raises(ConfigError) as info:
        loader(path)
    text = str(info.value)
    assert '\n' not in text
    assert text.startswith(path + ': ')
    return text


def test_good_cluster_defaults_and_endpoints(tmp_path):
    c = config.load_cluster(write(tmp_path, GOOD))
    assert c.name == 'c1'
    assert c.members == ['hA', 'hB', 'hW']
    assert c.lease.ttl == 3
    assert c.lease.renew_interval == 0.5
    assert c.lease.retry_interval == 0.2
    assert c.lease.request_timeout == 0.5
    assert c.lease.fence_margin == 0.5
    assert c.lease.kill_margin == 0.2
    assert c.api.port == 1215
    assert c.etcd_endpoints() == ['http://10.0.0.1:2379',
                                  'http://10.0.0.2:2379',
                                  'http://[fd00::3]:2379']
    assert c.services_dir == str(tmp_path / 'services')


def test_fast_lease_profile_and_a_key_that_overrides_it(tmp_path):
    c = config.load_cluster(write(tmp_path, GOOD + '[lease]\nprofile = fast\n'))
    assert (c.lease.ttl, c.lease.renew_interval, c.lease.retry_interval,
            c.lease.request_timeout, c.lease.fence_margin) == (
                2, 0.4, 0.1, 0.3, 0.3)
    c = config.load_cluster(write(tmp_path, GOOD + '[lease]\nprofile = fast\n'
                                  'ttl = 3\n'))
    assert c.lease.ttl == 3 and c.lease.renew_interval == 0.4
    assert c.lease.kill_margin == 0.1
    # A fence_margin below the kill_margin it leaves to its default: killed
    # at the fence_margin, with no suspension before.
    c = config.load_cluster(write(tmp_path, GOOD + '[lease]\n'
                                  'fence_margin = 100ms\n'))
    assert c.lease.fence_margin == c.lease.kill_margin == 0.1
    # The fast profile leaves room for one election of 500 ms, not more.
    text = error_of(write(tmp_path, GOOD + '[lease]\nprofile = fast\n'
                          '[etcd]\nelection_timeout = 1s\n'))
    assert '[lease] ttl: too short for an etcd election' in text
    assert '= 3 s must not exceed ttl (2 s)' in text


def test_units_of_durations_and_sizes():
    assert Key('d', 'duration').parse('500ms') == 0.5
    assert Key('d', 'duration').parse(' 2s ') == 2.0
    assert Key('d', 'duration').parse('5m') == 300.0
    assert Key('s', 'size').parse('2G') == 2 << 30
    assert Key('b', 'boolean').parse('Yes') is True


def test_example_files_are_valid():
    c = config.load_cluster(os.path.join(EXAMPLES, 'cluster.cfg'))
    services = config.load_services(c)
    assert [s.name for s in services] == ['comp-lab', 'web']
    assert services[1].service.hosts == ['hA', 'hB']


@pytest.mark.parametrize('text, section, key, words', [
    (GOOD + '[lease]\nttl = 3\nttll = 4\n', 'lease', 'ttll', 'unknown key'),
    (GOOD + '[lease]\nttl = three\n', 'lease', 'ttl', 'whole number'),
    (GOOD + '[lease]\nrenew_interval = soon\n', 'lease', 'renew_interval',
     'duration'),
    (GOOD + '[api]\nport = 70000\n', 'api', 'port', 'at most 65535'),
    (GOOD + '[etcd]\nmode = magic\n', 'etcd', 'mode', 'embedded, external'),
    (GOOD.replace('address = 10.0.0.2', 'address = host-b'), 'host hB',
     'address', 'IPv4 or IPv6'),
    (GOOD.replace('name = c1\n', ''), 'cluster', 'name', 'required key'),
    (GOOD.replace('[host hB]\naddress = 10.0.0.2\n', ''), 'host hB',
     'address', 'no [host hB] section'),
    (GOOD + '[host hX]\naddress = 10.0.0.9\n', 'host hX', None,
     'not listed'),
    (GOOD.replace('witnesses = hW\n', '').replace(
        '[host hW]\naddress = fd00::3\n', ''), 'cluster', 'witnesses',
     'add a witness'),
    (GOOD + '[lease]\nrenew_interval = 1.5\n', 'lease', 'renew_interval',
     'too close to ttl'),
    (GOOD + '[lease]\nttl = 2\n', 'lease', 'ttl',
     'too short for an etcd election'),
    (GOOD + '[lease]\nfence_margin = 3\n', 'lease', 'fence_margin',
     'below ttl'),
    (GOOD + '[lease]\nkill_margin = 600ms\n', 'lease', 'kill_margin',
     'must not exceed fence_margin'),
    (GOOD + '[lease]\nrequest_timeout = 2\n', 'lease', 'request_timeout',
     'renew_interval'),
    (GOOD + '[lease]\nretry_interval = 1\n', 'lease', 'retry_interval',
     'below renew_interval'),
    (GOOD + '[etcd]\nelection_timeout = 3s\n[lease]\nttl = 4\n'
     'renew_interval = 1\n', 'lease', 'ttl', 'at least 5'),
    (GOOD + '[etcd]\nmode = external\n', 'etcd', 'endpoints',
     'client URLs'),
    (GOOD + '[etcd]\nendpoints = 10.0.0.1:2379\n', 'etcd', 'endpoints',
     'URL'),
    (GOOD + '[wat]\nx = 1\n', 'wat', None, 'unknown section'),
    (GOOD + '[lease]\nttl = 3\nttl = 4\n', 'lease', 'ttl', 'twice'),
    (GOOD.replace('hosts = hA hB', 'hosts ='), 'cluster', 'hosts',
     'at least one host'),
    (GOOD + '[etcd]\nprefix = /' + 'p' * 1000000 + '\n', 'etcd', 'prefix',
     '1000001 characters, more than the 255 allowed'),
    (GOOD + '[etcd]\nprefix = /my prefix\n', 'etcd', 'prefix',
     'no white space'),
    (GOOD + '[lease]\nttl = ' + '9' * 1000000 + 'x\n', 'lease', 'ttl',
     "... (1000001 characters)"),
    (GOOD + '[api]\nmax_client_connections = 100\n', 'api',
     'max_client_connections', 'at most max_connections (64)'),
    (GOOD + '[replication]\nmax_peer_connections = 200\n', 'replication',
     'max_peer_connections', 'at most max_connections (128)'),
    (GOOD + '[replication]\nmax_connections = 0\n', 'replication',
     'max_connections', 'at least 1'),
])
def test_cluster_mistakes_name_section_and_key(tmp_path, text, section, key,
                                               words):
    path = write(tmp_path, text)
    message = error_of(path)
    where = '%s: [%s]' % (path, section)
    if key:
        where += ' ' + key + ':'
    assert message.startswith(where), message
    assert words in message, message
    assert len(message) < 400, message[:400]   # a value is cut


def test_unreadable_and_malformed_files(tmp_path):
    missing = str(tmp_path / 'nope.cfg')
    assert 'cannot read' in error_of(missing)
    folder = str(tmp_path)
    assert 'cannot read' in error_of(folder)
    outside = write(tmp_path, 'name = x\n[cluster]\n', 'outside.cfg')
    assert 'line 1 is outside any [section]' in error_of(outside)
    garbage = write(tmp_path, '[cluster]\nthis is not ini\n', 'garbage.cfg')
    assert 'cannot parse line 2' in error_of(garbage)
    binary = tmp_path / 'binary.cfg'
    binary.write_bytes(b'[cluster]\nname = \xff\xfe\n')
    assert 'not UTF-8' in error_of(str(binary))


def test_service_files(tmp_path):
    cluster = config.load_cluster(write(tmp_path, GOOD))
    good = write(tmp_path, '[service]\nhosts = hB hA\norchestrate = manual\n',
                 'services/db.cfg')
    s = config.load_service(good, cluster)
    assert (s.name, s.service.hosts, s.service.orchestrate) == \
        ('db', ['hB', 'hA'], 'manual')
    default = write(tmp_path, '[service]\n', 'services/web.cfg')
    assert config.load_service(default, cluster).service.hosts == \
        ['hA', 'hB']

    def bad(text, name='bad.cfg'):
        path = write(tmp_path, text, 'services/' + name)
        return error_of(path, lambda p: config.load_service(p, cluster))
    assert '[service] hosts: host \'hW\' is not one of' in \
        bad('[service]\nhosts = hA hW\n')
    assert '[service] on_failure: expected one of switch, stop, freeze' in \
        bad('[service]\non_failure = panic\n')
    assert '[service] restart: must be at least 0' in \
        bad('[service]\nrestart = -1\n')
    assert "[nope#x]: unknown resource kind 'nope'" in bad('[nope#x]\n')
    assert '[junk]: unknown section' in bad('[junk]\n')
    assert 'service name from the file name' in bad('[service]\n',
                                                    'bad name!.cfg')
    # A service that could run nowhere, or names a host twice.
    assert '[service] hosts: empty: the service could run nowhere' in \
        bad('[service]\nhosts =\n')
    assert '[service] hosts: host \'hA\' is listed twice' in \
        bad('[service]\nhosts = hA hB hA\n')
    # A megabyte-long bad value is cut in the one line that names it.
    message = bad('[service]\non_failure = ' + 'x' * 4000 + '\n')
    assert '[service] on_failure: expected one of switch, stop, freeze' \
        ' (got \'xxxx' in message and len(message) < 400
    message = bad('[service]\non_failure = ' + 'x' * 1000000 + '\n')
    assert '[service] on_failure: 1000000 characters, more than the 4096' \
        ' allowed' in message and len(message) < 400
    message = bad('[service]\n' + 'k' * 100000 + ' = 1\n')
    assert 'unknown key' in message and len(message) < 600


def test_resource_kinds_declare_their_keys(tmp_path):
    @resources.register
    class TestKind(resources.Resource):
        """a kind of the test's"""
        kind = 'testkind'
        keys = (Key('command', 'string', REQUIRED, 'what to run'),
                Key('every', 'duration', 60.0, 'how often'))
    try:
        cluster = config.load_cluster(write(tmp_path, GOOD))
        path = write(tmp_path, '[testkind#one]\ncommand = true\nevery = 5s\n'
                     '[testkind#two]\ncommand = false\noptional = yes\n',
                     'services/t.cfg')
        s = config.load_service(path, cluster)
        assert [(r.rid, r.kind, r.every, r.optional) for r in s.resources] \
            == [('testkind#one', 'testkind', 5.0, False),
                ('testkind#two', 'testkind', 60.0, True)]
        bad = write(tmp_path, '[testkind#x]\nevery = 5s\n', 'services/u.cfg')
        assert '[testkind#x] command: required key is missing' in \
            error_of(bad, lambda p: config.load_service(p, cluster))
        assert '[testkind#<name>]  a kind of the test\'s' in \
            config.describe_schema()
    finally:
        resources._CLASSES.pop('testkind')


def run(cmd, *args, env=None):
    return subprocess.run(list(cmd) + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          env=env, timeout=60)


def test_cli_help_lists_commands(slaposha_cmd):
    p = run(slaposha_cmd, '--help')
    assert p.returncode == 0
    for word in ('config', 'version', '--cluster'):
        assert word in p.stdout
    p = run(slaposha_cmd, 'config', '--help')
    assert 'check' in p.stdout and 'keys' in p.stdout
    p = run(slaposha_cmd, 'config', 'keys')
    assert 'renew_interval (duration, default 0.5)' in p.stdout


def test_cli_config_keys_lists_every_key_of_every_resource_kind(
        slaposha_cmd):
    from slaposha.resources import DRIVERS, driver
    out = run(slaposha_cmd, 'config', 'keys').stdout
    for kind in DRIVERS:
        section = out.split('\n[%s#<name>]' % kind)[1].split('\n[')[0]
        for key in ('disable', 'optional') + tuple(
                k.name for k in driver(kind).keys):
            assert '\n  %s (' % key in section, (kind, key)


def test_cli_config_check(tmp_path, slaposha_cmd):
    p = run(slaposha_cmd, '--cluster', os.path.join(EXAMPLES, 'cluster.cfg'),
            'config', 'check')
    assert p.returncode == 0, p.stderr
    assert 'cluster lab, hosts hA hB, witnesses hW' in p.stdout
    assert '2 service(s): comp-lab web' in p.stdout


def test_cli_config_check_needs_the_ssl_folder_with_tls(tmp_path,
                                                       slaposha_cmd):
    path = write(tmp_path, GOOD.replace('witnesses = hW', 'witnesses = hW\n'
                                        'tls = true'))
    p = run(slaposha_cmd, '-c', path, 'config', 'check')
    assert p.returncode == 2 and p.stderr.count('\n') == 1, p.stderr
    assert '[cluster] tls: tls = true but %s does not exist' % (
        tmp_path / 'ssl') in p.stderr
    (tmp_path / 'ssl').mkdir()
    p = run(slaposha_cmd, '-c', path, 'config', 'check')
    assert p.returncode == 2 and 'ca.crt is missing' in p.stderr
    (tmp_path / 'ssl' / 'ca.crt').write_text('')
    p = run(slaposha_cmd, '-c', path, 'config', 'check')
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize('text, expected', [
    (GOOD + '[lease]\nttl = 3\nttll = 4\n', '[lease] ttll: unknown key'),
    (GOOD + '[lease]\nrenew_interval = 2\n',
     '[lease] renew_interval: too close to ttl'),
    (None, 'cannot read: No such file or directory'),
])
def test_cli_bad_config_is_one_line(tmp_path, slaposha_cmd, text, expected):
    path = write(tmp_path, text) if text else str(tmp_path / 'missing.cfg')
    p = run(slaposha_cmd, '-c', path, 'config', 'check')
    assert p.returncode == 2
    assert p.stdout == ''
    assert p.stderr.count('\n') == 1, p.stderr
    assert p.stderr.startswith('slaposha: %s: ' % path)
    assert expected in p.stderr
    assert 'Traceback' not in p.stderr


def test_cli_config_from_environment(tmp_path, slaposha_cmd):
    path = write(tmp_path, GOOD.replace('name = c1', 'name = fromenv'))
    env = dict(os.environ, SLAPOSHA_CONFIG=path)
    p = run(slaposha_cmd, 'config', 'check', env=env)
    assert p.returncode == 0 and 'cluster fromenv' in p.stdout


def test_cli_unknown_command_fails(slaposha_cmd):
    p = run(slaposha_cmd, 'frobnicate')
    assert p.returncode == 2
    assert 'invalid choice' in p.stderr and 'Traceback' not in p.stderr
