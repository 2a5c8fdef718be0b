"""Packaging: the buildout recipes, the software release and `slapos ha`.

Real zc.buildout runs, with no network: the recipes from this environment;
the software release from a wheel of this checkout, built by a Python that
has buildout and slaposha's dependencies but not slaposha, as a SlapOS
node's has; its instance profile for both software types, as slapgrid runs
it (offline, with [slap-connection] appended). `slapos ha` against a lab
cluster.
"""

import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest

from slaposha.lab.cluster import LabCluster, Observer, check_no_overlap
from slaposha.lab.release import build_wheel, local_release

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
BIN = os.path.dirname(sys.executable)
SOFTWARE_DIR = os.path.join(TOP, 'software', 'slaposha')

# What a node's Python has for the release: buildout, its egg recipe and
# slaposha's dependencies (reference/slapos-internals.md 8).
NODE_DISTS = ('zc.buildout', 'zc.recipe.egg', 'setuptools', 'pip', 'wheel',
              'requests', 'lxml', 'supervisor', 'cryptography')

AGENT = '''\
[buildout]
parts = agent
offline = true

[agent]
recipe = slaposha:agent
cluster-name = lab
hosts = hA=10.0.0.1 hB=10.0.0.2
witnesses = hW=10.0.0.3
host = hA
service-name = web
service =
  [service]
  hosts = hA hB
  [app#main]
  command = sleep 1d
lease-ttl = 4
lease-renew-interval = 1200ms
api-port = 1216
wrapper-path = ${buildout:directory}/etc/service/slaposha-agent
slaposha = /opt/slaposha/bin/slaposha
'''


def buildout(folder, *args, python=None, check=True):
    """Run buildout in ``folder`` (away from this checkout, so that only
    installed code is seen)."""
    if python is None:
        command = [os.path.join(BIN, 'buildout')]
    else:
        command = [python, '-c', 'import sys; from zc.buildout.buildout'
                   ' import main; sys.exit(main())']
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    p = subprocess.run(command + list(args), cwd=folder, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True, timeout=120)
    if check:
        assert p.returncode == 0, p.stdout
    return p


def slaposha(*args, executable=None, check=True):
    p = subprocess.run([executable or os.path.join(BIN, 'slaposha')]
                       + list(args), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, universal_newlines=True,
                       timeout=60)
    if check:
        assert p.returncode == 0, p.stderr
    return p


# -- the recipes ---------------------------------------------------------------

def test_agent_recipe_writes_what_the_agent_accepts(tmp_path):
    (tmp_path / 'buildout.cfg').write_text(AGENT)
    buildout(tmp_path, '-o')
    cfg = tmp_path / 'etc' / 'slaposha' / 'cluster.cfg'
    out = slaposha('-c', str(cfg), 'config', 'check').stdout
    assert out == ('%s: cluster lab, hosts hA hB, witnesses hW, etcd'
                   ' embedded, 1 service(s): web\n' % cfg)
    from slaposha import config
    cluster = config.load_cluster(str(cfg))
    assert (cluster.lease.ttl, cluster.lease.renew_interval,
            cluster.api.port) == (4, 1.2, 1216)
    assert cluster.hosts['hW'].address == '10.0.0.3'
    service = config.load_service(str(cfg.parent / 'services' / 'web.cfg'),
                                  cluster)
    assert [r.rid for r in service.resources] == ['app#main']
    wrapper = tmp_path / 'etc' / 'service' / 'slaposha-agent'
    assert os.access(str(wrapper), os.X_OK)
    assert wrapper.read_text().splitlines()[-1] == (
        'exec /opt/slaposha/bin/slaposha -c %s agent --host hA' % cfg)
    agent_text = cfg.read_text()
    # The witness of the same cluster: same file, its own wrapper (and the
    # agent's part, no longer listed, is removed).
    (tmp_path / 'buildout.cfg').write_text(AGENT.replace(
        'parts = agent', 'parts = witness') + textwrap.dedent('''
        [witness]
        <= agent
        recipe = slaposha:witness
        host = hW
        service-name =
        service =
        config-file = ${buildout:directory}/witness/cluster.cfg
        wrapper-path = ${buildout:directory}/etc/service/slaposha-witness
        '''))
    buildout(tmp_path, '-o')
    witness = (tmp_path / 'witness' / 'cluster.cfg').read_text()
    assert witness.split('\n', 1)[1] == agent_text.split('\n', 1)[1]
    assert (tmp_path / 'etc' / 'service' / 'slaposha-witness').read_text(
        ).endswith('witness --host hW\n')
    assert not (tmp_path / 'etc' / 'service' / 'slaposha-agent').exists()


def test_agent_recipe_takes_the_fast_lease_profile(tmp_path):
    """lease-profile = fast, as the software release's schema offers it:
    the cluster file gives the agent the fast timings, and a lease key
    given beside it still wins."""
    from slaposha import config
    text = AGENT.replace('lease-ttl = 4\n', '').replace(
        'lease-renew-interval = 1200ms\n', 'lease-profile = fast\n')
    (tmp_path / 'buildout.cfg').write_text(text)
    buildout(tmp_path, '-o')
    cfg = str(tmp_path / 'etc' / 'slaposha' / 'cluster.cfg')
    lease = config.load_cluster(cfg).lease
    assert (lease.profile, lease.ttl, lease.renew_interval,
            lease.retry_interval, lease.request_timeout,
            lease.fence_margin) == ('fast', 2, 0.4, 0.1, 0.3, 0.3)
    buildout(tmp_path, '-o', 'agent:lease-fence-margin=200ms')
    lease = config.load_cluster(cfg).lease
    assert (lease.ttl, lease.fence_margin) == (2, 0.2)


@pytest.mark.parametrize('setting, message', [
    ('lease-ttl=0', '[agent] lease-ttl: must be at least 1 (got 0)'),
    ('lease-fence-margin=4', '[agent] lease-fence-margin: must be below ttl'),
    ('etcd-mode=raft', '[agent] etcd-mode: expected one of embedded,'
     ' external'),
    ('hosts=hA', "[agent] hosts: expected name=address pairs such as"
     " hA=10.0.0.1 (got 'hA')"),
    ('hosts=hA=10.0.0.1 hB=nowhere', "[agent] hosts: expected an IPv4 or"
     " IPv6 address (got 'nowhere')"),
    ('witnesses=', '[agent] witnesses: two etcd members lose quorum'),
    ('host=hZ', "[agent] host: 'hZ' is not one of the hosts (hA hB)"),
    ('service=[app#main]', '[agent] service: [app#main]: needs exactly one'
     ' of command or start'),
    ('lease-tll=3', '[agent] lease-tll: unknown option (known: '),
    ('lease-profile=quick', '[agent] lease-profile: expected one of default, fast'),
])
def test_a_bad_option_fails_the_buildout_naming_it(tmp_path, setting,
                                                   message):
    (tmp_path / 'buildout.cfg').write_text(AGENT)
    p = buildout(tmp_path, '-o', 'agent:' + setting, check=False)
    assert p.returncode != 0
    errors = [line for line in p.stdout.splitlines()
              if line.startswith('Error: ')]
    assert len(errors) == 1 and errors[0].startswith('Error: ' + message), \
        p.stdout
    assert 'Traceback' not in p.stdout
    assert not (tmp_path / 'etc').exists()


def test_schemas_name_only_what_the_recipes_take():
    from slaposha.config import CLUSTER_SCHEMA, LEASE_PROFILES
    from slaposha.recipes.agent import (
        Recipe, WitnessRecipe, _settings, option_name, parameter_schema)
    with open(os.path.join(SOFTWARE_DIR, 'software.cfg.json')) as f:
        release = json.load(f)
    assert sorted(release['software-type']) == ['default', 'witness']
    parts = {}
    with open(os.path.join(SOFTWARE_DIR, 'instance.cfg.in')) as f:
        for line in f:
            if line.startswith('parts-'):
                kind, value = line[len('parts-'):].split(' = ')
                parts[kind] = value.split()
    assert sorted(parts) == sorted(release['software-type'])
    for kind, recipe in (('default', Recipe), ('witness', WitnessRecipe)):
        entry = release['software-type'][kind]
        for schema in ('request', 'response'):
            with open(os.path.join(SOFTWARE_DIR, entry[schema])) as f:
                json.load(f)
        with open(os.path.join(SOFTWARE_DIR, entry['request'])) as f:
            schema = json.load(f)
        known = set(_settings()) | {'cluster-name', 'hosts', 'witnesses',
                                    'host'}
        if recipe.role == 'agent':
            known |= {'service-name', 'service'}
        assert set(schema['properties']) <= known, kind
        assert set(schema['required']) == {'cluster-name', 'hosts', 'host'}
        # The files are what parameter_schema writes (software/README.rst):
        # a key added to slaposha.config is offered once they are written
        # again.
        assert schema == json.loads(json.dumps(parameter_schema(
            recipe.role))), kind
        # Every lease timing is offered, the profile too; the keys a profile
        # sets have no default of their own (a form that fills defaults in
        # would override the profile chosen).
        lease = set(option_name('lease', k) for k in CLUSTER_SCHEMA['lease'])
        assert lease <= set(schema['properties']), kind
        for option in lease - {'lease-profile'}:
            assert 'default' not in schema['properties'][option], option
        assert schema['properties']['lease-profile']['enum'] == sorted(
            LEASE_PROFILES)


# -- the software release ------------------------------------------------------

def node_python(folder):
    """A Python as a SlapOS node has one: buildout and slaposha's
    dependencies (links to this environment's), not slaposha."""
    from importlib import metadata
    from packaging.requirements import Requirement
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip',
                    str(folder)], check=True)
    site = glob.glob(os.path.join(str(folder), 'lib', 'python*',
                                  'site-packages'))[0]
    seen, todo = set(), list(NODE_DISTS)
    while todo:
        dist = metadata.distribution(todo.pop())
        key = dist.metadata['Name'].lower().replace('_', '-')
        if key in seen:
            continue
        seen.add(key)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({'extra': ''}):
                todo.append(req.name)
        for entry in dist.files or []:
            top = entry.parts[0]
            if top == '..' or top.endswith('.pth'):
                continue
            target = os.path.join(site, top)
            if not os.path.lexists(target):
                os.symlink(os.path.join(str(dist.locate_file('')), top),
                           target)
    assert 'slaposha' not in seen
    return os.path.join(str(folder), 'bin', 'python')


SLAP_CONNECTION = '''
[slap-connection]
computer-id = COMP-TEST
partition-id = slappart0
server-url =
software-release-url = {url}
key-file =
cert-file =

[slap-configuration]
# No master here: the parameters it would send.
software-type = {software_type}
parameters = {parameters}
'''


def instantiate(folder, software, url, software_type, parameters, python,
                check=True):
    """Run the release's instance profile in a partition folder as slapgrid
    does: its instance.cfg, then [slap-connection], offline."""
    folder.mkdir()
    with open(os.path.join(software, 'instance.cfg')) as f:
        text = f.read()
    (folder / 'buildout.cfg').write_text(
        text + SLAP_CONNECTION.format(url=url, software_type=software_type,
                                      parameters=json.dumps(parameters))
        + '\n[buildout]\nbin-directory = sbin\noffline = true\n')
    return buildout(folder, python=python, check=check)


def test_software_release_builds_offline_and_deploys_both_types(tmp_path):
    python = node_python(tmp_path / 'node')
    wheels = build_wheel(str(tmp_path / 'wheels'))
    url = local_release(str(tmp_path / 'release'), find_links=wheels)
    software = tmp_path / 'software'   # as slapgrid's software_root/<md5>
    software.mkdir()
    (software / 'buildout.cfg').write_text('[buildout]\nextends = %s\n'
                                           % url)
    buildout(software, python=python)
    egg, = glob.glob(str(software / 'eggs' / '*' / 'slaposha-*.egg'))
    bin_slaposha = str(software / 'bin' / 'slaposha')
    assert egg in open(bin_slaposha).read()
    assert slaposha('--version', executable=bin_slaposha).stdout.startswith(
        'slaposha ')
    assert '${slap-connection:server-url}' in (software / 'instance.cfg'
                                               ).read_text()

    parameters = {'cluster-name': 'lab', 'hosts': 'hA=10.0.0.1 hB=10.0.0.2',
                  'witnesses': 'hW=10.0.0.3', 'lease-ttl': 4,
                  'service-name': 'web', 'service':
                  '[service]\nhosts = hA hB\n[app#main]\ncommand = sleep 1d\n'}
    agent = tmp_path / 'slappart0'
    instantiate(agent, str(software), url, 'default',
                dict(parameters, host='hB'), python)
    cfg = agent / 'etc' / 'slaposha' / 'cluster.cfg'
    out = slaposha('-c', str(cfg), 'config', 'check',
                   executable=bin_slaposha).stdout
    assert 'cluster lab, hosts hA hB, witnesses hW, etcd embedded, 1' \
        ' service(s): web' in out
    text = cfg.read_text()
    for line in ('state_dir = %s/srv/slaposha' % agent,
                 'run_dir = %s/var/run/slaposha' % agent,
                 'ssl_dir = %s/etc/slaposha/ssl' % agent, 'ttl = 4'):
        assert line in text.splitlines()
    wrapper = agent / 'etc' / 'service' / 'slaposha-agent'
    assert os.access(str(wrapper), os.X_OK)
    assert wrapper.read_text().splitlines()[-1] == \
        'exec %s -c %s agent --host hB' % (bin_slaposha, cfg)
    published = json.loads((agent / '.slaposha-connection.json').read_text())
    assert published == {
        'api-url': 'https://10.0.0.2:1215', 'cluster': 'lab', 'host': 'hB',
        'config-file': str(cfg),
        'status': 'agent starting: not answering yet on %s/var/run/slaposha'
                  '/agent.sock' % agent}

    witness = tmp_path / 'slappart1'
    instantiate(witness, str(software), url, 'witness',
                dict(parameters, host='hW'), python)
    cfg = witness / 'etc' / 'slaposha' / 'cluster.cfg'
    slaposha('-c', str(cfg), 'config', 'check', executable=bin_slaposha)
    assert os.listdir(str(witness / 'etc' / 'service')) == \
        ['slaposha-witness']
    assert (witness / 'etc' / 'service' / 'slaposha-witness').read_text(
        ).endswith('witness --host hW\n')
    published = json.loads((witness / '.slaposha-connection.json'
                            ).read_text())
    assert published['etcd-url'] == 'http://10.0.0.3:2379'
    assert 'api-url' not in published

    # A mistake in the parameters fails the partition's buildout in one
    # line that names the parameter.
    p = instantiate(tmp_path / 'slappart2', str(software), url, 'default',
                    dict(parameters, host='hB', **{'lease-ttl': 0}), python,
                    check=False)
    assert p.returncode != 0
    assert 'Error: [agent] lease-ttl: must be at least 1 (got 0)' in \
        p.stdout.splitlines()


# -- slapos ha -----------------------------------------------------------------

def slapos(*args, env=None):
    return subprocess.run([os.path.join(BIN, 'slapos')] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60, env=env)


def test_slapos_help_lists_the_ha_commands():
    p = slapos('--help')
    assert p.returncode == 0, p.stderr
    section = p.stdout.split('ha commands:\n')[1].split('\n\n')[0]
    listed = [line.split('  ')[1].strip() for line in section.splitlines()]
    # Every operator's command of slaposha, under the same words (those
    # under `slaposha slapos` without that word), each registered in
    # setup.py: a class missing there would not be listed.
    from slaposha.cli.ha import COMMANDS, ha_name
    assert sorted(listed) == sorted(
        'ha ' + ha_name(command) for _, command, _ in COMMANDS)
    assert 'ha data diverged list' in listed and 'ha restore' in listed
    assert 'the cluster as a tree' in section


def test_slapos_survives_a_slaposha_that_cannot_load(tmp_path):
    # A node where slaposha's own code cannot be imported (a dependency
    # missing): slapos still works and `slapos ha` says why in one line.
    (tmp_path / 'sitecustomize.py').write_text(
        'import sys\nsys.modules["slaposha.cli.main"] = None\n')
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    p = slapos('--help', env=env)
    assert p.returncode == 0, p.stderr
    assert 'ha status' in p.stdout and 'node instance' in p.stdout
    p = slapos('ha', 'status', '--cfg', '/nonexistent', env=env)
    assert p.returncode == 2
    assert p.stderr.startswith('slapos ha status: slaposha cannot be loaded'
                               ' in this Python (')
    assert p.stderr.count('\n') == 1


def test_slapos_ha_errors_are_one_line(tmp_path):
    p = slapos('ha', 'status', '--cfg', str(tmp_path / 'none.cfg'))
    assert p.returncode == 2
    assert p.stderr == 'slapos ha status: %s: cannot read: No such file or' \
        ' directory\n' % (tmp_path / 'none.cfg')
    # The adoption commands too, under their slapos names.
    p = slapos('ha', 'prepare-standby', '--reference',
               str(tmp_path / 'none.json'))
    assert p.returncode == 2
    assert p.stderr.startswith('slapos ha prepare-standby: %s: cannot read'
                               ' the fingerprint' % (tmp_path / 'none.json'))
    assert p.stderr.count('\n') == 1
    # A command of several words is named by all of them.
    p = slapos('ha', 'data', 'diverged', 'list', '--cfg',
               str(tmp_path / 'none.cfg'))
    assert p.returncode == 2
    assert p.stderr == 'slapos ha data diverged list: %s: cannot read: No' \
        ' such file or directory\n' % (tmp_path / 'none.cfg')


@pytest.mark.lab
def test_slapos_ha_status_and_switch_on_a_lab_cluster(make_lab):
    lab = make_lab(['hA', 'hB', 'hW'])
    marker = str(86400 + int(lab.id, 16))
    lc = LabCluster(lab, ['hA', 'hB'], ['hW'], services={'web': '''
        [service]
        hosts = hA hB
        [app#main]
        command = exec sleep %s
    ''' % marker}).start()
    observer = Observer(lab, marker).start()
    try:
        observer.wait_running('hA', 30)

        # As an operator runs it: slaposha from its installed metadata (the
        # lab's PYTHONPATH of this checkout would read the entry points of
        # whatever slaposha.egg-info a build left there).
        env = {k: v for k, v in lc.env().items() if k != 'PYTHONPATH'}

        def ha(host, *args):
            return lab[host].run([os.path.join(BIN, 'slapos'), 'ha'] + list(
                args) + ['--cfg', lc.cluster_file], env=env)

        def tree(text):   # the lease's seconds left change at each call
            return [line for line in text.splitlines()
                    if not line.startswith('  lease ')]

        from slaposha.lab import wait_for
        wait_for(lambda: 'app#main       up' in lc.cli('hB', 'status').stdout,
                 15, what='resources published')
        out = ha('hB', 'status').stdout
        assert 'web        up       on hA' in out
        assert '(seen from hB)' in out
        assert tree(out) == tree(lc.cli('hB', 'status').stdout)
        out = ha('hA', 'switch', 'web', '--to', 'hB').stdout
        assert 'web: runs on hB' in out
        assert observer.where() == ['hB']
        ha('hA', 'freeze', 'web')
        assert 'FROZEN by operator on hA' in ha('hB', 'status').stdout
        ha('hA', 'thaw', 'web')
        check_no_overlap(observer)
    finally:
        observer.stop()
        for host in lc.hosts:
            lc.stop_agent(host)
