"""The SlapOS node as it changes, on folders laid out as slapgrid leaves
them (no lab): the fingerprint and what a standby lacks (named by URL),
the copies of software releases driven by the standbys' reports, the
partitions set aside when the instance supervisord (the real one) refuses
their files, and the per-partition status."""

import hashlib
import os
import subprocess
import sys
import textwrap

from slaposha.slapos.node import (
    compare, fingerprint, load_node, local_facts, release_url)
from slaposha.slapos.partitions import (
    ASIDE_SUFFIX, AsideBook, missing_folders, partition_rows,
    refused_partition, row_line)
from slaposha.slapos.releases import Copies

URL = 'http://example.org/sr/second/software.cfg'
MD5 = hashlib.md5(URL.encode()).hexdigest()


def make_node(tmp_path, partitions=3):
    """A node on disk: slapos.cfg, a completed software release built
    from URL, ``partitions`` partitions running it, each started (its
    program file in supervisord.conf.d), a format definition with the
    computer's own address."""
    instance, software = tmp_path / 'srv', tmp_path / 'opt'
    (instance / 'etc' / 'supervisord.conf.d').mkdir(parents=True)
    release = software / MD5
    release.mkdir(parents=True)
    (release / 'buildout.cfg').write_text(
        '[buildout]\nextends = %s\nshared-part-list =\n' % URL)
    (release / '.completed').write_text('')
    definition = tmp_path / 'definition.cfg'
    definition.write_text('[computer]\naddress = fd42:213:0:1::1/'
                          'ffff:ffff:ffff:ffff::\n')
    cfg = tmp_path / 'slapos.cfg'
    cfg.write_text(textwrap.dedent('''\
        [slapos]
        computer_id = COMP-T
        instance_root = %s
        software_root = %s
        [slapformat]
        interface_name = lo
        input_definition_file = %s
        ''' % (instance, software, definition)))
    for n in range(partitions):
        part = instance / ('slappart%d' % n)
        part.mkdir()
        os.symlink(str(release), str(part / 'software_release'))
        program = 'slappart%d_service-on-watch' % n
        (instance / 'etc' / 'supervisord.conf.d' / (
            'slappart%d.conf' % n)).write_text(textwrap.dedent('''\
            [group:slappart%d]
            programs = %s
            [program:%s]
            directory = %s
            command = /bin/sleep 1000
            autostart = false
            startsecs = 0
            stdout_logfile = %s/.%s.log
            ''' % (n, program, program, part, part, program)))
    return load_node(str(cfg))


def test_fingerprint_names_each_release_by_url_and_lists_partitions(
        tmp_path):
    node = make_node(tmp_path, partitions=2)
    # A free partition (destroyed by slapgrid: an empty folder) is not in
    # use.
    (tmp_path / 'srv' / 'slappart2').mkdir()
    printed = fingerprint(node)
    assert printed['version'] == 2
    assert printed['software_releases'] == [MD5]
    assert printed['software_urls'] == {MD5: URL}
    assert printed['partitions'] == {'slappart0': MD5, 'slappart1': MD5}
    assert printed['computer_address'] == 'fd42:213:0:1::1/64'
    assert release_url(str(tmp_path / 'opt' / MD5)) == URL
    # A buildout.cfg whose URL is not the folder's: no URL, no guess.
    other = tmp_path / 'opt' / ('0' * 32)
    other.mkdir()
    (other / 'buildout.cfg').write_text('[buildout]\nextends = %s\n' % URL)
    assert release_url(str(other)) is None


def test_a_standby_lacking_a_release_is_told_its_url_and_folder(tmp_path):
    owner = fingerprint(make_node(tmp_path / 'a'))
    standby = make_node(tmp_path / 'b')
    assert compare(owner, local_facts(standby, owner)) == [
        'instance_root is %s here but %s on the owner: use the same path'
        % (standby.instance_root, owner['instance_root']),
        'software_root is %s here but %s on the owner: use the same path'
        % (standby.software_root, owner['software_root'])]
    # Same paths, the release deleted on the standby.
    owner = fingerprint(standby)
    os.unlink(os.path.join(standby.software_root, MD5, '.completed'))
    problems = compare(owner, local_facts(standby, owner))
    assert problems == [
        'software release %s (%s/%s) is incomplete (no .completed) here: the'
        ' owner\'s agent copies it to each standby (its status says how far)'
        % (URL, standby.software_root, MD5)]
    # A version 1 fingerprint (no URLs) names the folder.
    del owner['software_urls']
    assert compare(owner, local_facts(standby, owner))[0].startswith(
        'software release %s/%s is incomplete' % (standby.software_root,
                                                   MD5))


def test_copies_follow_the_standbys_reports_with_backoff():
    copies = Copies(retry_min=5, retry_max=20, confirm_within=15)
    have = ['r1', 'r2']
    # hB has r1, hC nothing; hD sent no report (not alive): left alone.
    assert copies.due(have, {'hB': {'r1'}, 'hC': set()}, now=0) == [
        ('hB', 'r2'), ('hC', 'r1'), ('hC', 'r2')]
    copies.sent('hB', 'r2', now=1)
    assert copies.failed('hC', 'r1', 'connection refused', now=1) == 5
    assert copies.failed('hC', 'r2', 'connection refused', now=1) == 5
    # Sent but not yet reported, or waiting for its retry: not now.
    assert copies.due(have, {'hB': {'r1'}, 'hC': set()}, now=2) == []
    assert copies.next_retry() == 6
    assert copies.problems(lambda r: 'URL-' + r, now=3) == [
        'software release URL-%s to hC: 1 failed try, the last 2.0 s ago:'
        ' connection refused; next try in 3.0 s' % r for r in have]
    assert copies.due(have, {'hB': {'r1'}, 'hC': set()}, now=6) == [
        ('hC', 'r1'), ('hC', 'r2')]
    assert copies.failed('hC', 'r1', 'refused', now=6) == 10
    assert copies.failed('hC', 'r1', 'refused', now=16) == 20
    assert copies.failed('hC', 'r1', 'refused', now=36) == 20  # the cap
    # The standby reports r2: confirmed. Deleted there later: sent again
    # at once, whatever the owner remembers.
    assert copies.due(have, {'hB': {'r1', 'r2'}}, now=7) == []
    assert copies.due(have, {'hB': {'r1'}}, now=8) == [('hB', 'r2')]
    # A copy the standby never confirms is sent again after
    # confirm_within.
    copies.sent('hB', 'r2', now=8)
    assert copies.due(have, {'hB': {'r1'}}, now=22) == []
    assert copies.due(have, {'hB': {'r1'}}, now=24) == [('hB', 'r2')]
    assert copies.problems(str, now=24) == []


def supervisord(node, keep=False):
    """Run the real supervisord on the node's configuration as slapgrid
    does; returns (exit code, output). A daemon that started is shut
    down, unless ``keep``."""
    conf = os.path.join(node.instance_root, 'etc', 'supervisord.conf')
    with open(conf, 'w') as f:
        f.write(textwrap.dedent('''\
            [unix_http_server]
            file = %(root)s/sv.sock
            [supervisord]
            logfile = %(root)s/supervisord.log
            pidfile = %(root)s/supervisord.pid
            [rpcinterface:supervisor]
            supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface
            [include]
            files = %(root)s/etc/supervisord.conf.d/*.conf
            ''' % {'root': node.instance_root}))
    from slaposha.slapos.supervisor import SUPERVISORD, rpc
    p = subprocess.run([sys.executable, '-c', SUPERVISORD, conf],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True, timeout=30)
    if p.returncode == 0 and not keep:
        rpc(node.supervisord_socket).supervisor.shutdown()
    return p.returncode, p.stdout


def test_a_partition_supervisord_refuses_is_named_and_set_aside(tmp_path):
    node = make_node(tmp_path)
    conf_dir = node.supervisord_conf_dir
    # slappart1's folder is gone, its program file still there: the real
    # supervisord refuses the whole configuration, naming the file.
    os.rename(os.path.join(node.instance_root, 'slappart1'),
              str(tmp_path / 'elsewhere'))
    code, output = supervisord(node)
    assert code != 0
    assert refused_partition(node, output) == 'slappart1'
    assert missing_folders(node) == {
        'slappart1': 'its folder %s/slappart1 is missing while etc/'
        'supervisord.conf.d/slappart1.conf is still there'
        % node.instance_root}
    book = AsideBook(node)
    assert book.set_aside('slappart1', 'its folder is missing') == [
        'slappart1.conf']
    assert sorted(os.listdir(conf_dir)) == [
        'slappart0.conf', 'slappart1' + ASIDE_SUFFIX, 'slappart2.conf']
    assert supervisord(node)[0] == 0  # the others start
    rows = partition_rows(node, aside=AsideBook(node).current())
    assert [(r['id'], r['requested'], r['problem']) for r in rows] == [
        ('slappart0', 'started', None),
        ('slappart1', 'started', rows[1]['problem']),
        ('slappart2', 'started', None)]
    assert rows[1]['problem'].endswith(': its folder is missing')
    assert row_line(rows[1]).startswith('slappart1  started    ! set aside')
    # A file that does not parse: named too.
    with open(os.path.join(conf_dir, 'slappart2.conf'), 'a') as f:
        f.write('garbage\n')
    assert refused_partition(node, supervisord(node)[1]) == 'slappart2'
    # The next start puts every file back and checks again; a file that
    # slapgrid wrote meanwhile wins over the one set aside.
    with open(os.path.join(conf_dir, 'slappart1.conf'), 'w') as f:
        f.write('# rewritten by slapgrid\n')
    AsideBook(node).restore()
    assert sorted(os.listdir(conf_dir)) == [
        'slappart0.conf', 'slappart1.conf', 'slappart2.conf']
    with open(os.path.join(conf_dir, 'slappart1.conf')) as f:
        assert f.read() == '# rewritten by slapgrid\n'
    assert AsideBook(node).records == {}


def test_a_partition_whose_folder_is_back_starts_in_the_running_node(
        tmp_path):
    from types import SimpleNamespace
    from slaposha.resources.slapos import Slapos
    from slaposha.slapos.supervisor import rpc
    node = make_node(tmp_path)
    part1 = os.path.join(node.instance_root, 'slappart1')
    os.rename(part1, str(tmp_path / 'elsewhere'))
    book = AsideBook(node)
    book.set_aside('slappart1', 'its folder is missing', 'folder')
    book.set_aside('slappart2', 'supervisord refuses its program file')
    code, output = supervisord(node, keep=True)
    assert code == 0, output
    server = rpc(node.supervisord_socket)
    try:
        server.supervisor.startProcessGroup('slappart0', True)
        before = server.supervisor.getProcessInfo(
            'slappart0:slappart0_service-on-watch')['pid']
        conf = SimpleNamespace(
            rid='slapos#node', cfg=str(tmp_path / 'slapos.cfg'), timeout=10.0,
            aside_retry=1.0, copy_retry=1.0, copy_retry_max=4.0,
            copy_interval=1.0, announce=False)
        res = Slapos(conf, None)
        res._retry_aside()  # the folder is still missing: nothing done
        assert sorted(AsideBook(node).current()) == ['slappart1', 'slappart2']
        os.rename(str(tmp_path / 'elsewhere'), part1)
        assert AsideBook(node).repaired() == ['slappart1']  # not slappart2
        res._retry_aside()
        info = {i['name']: i for i in server.supervisor.getAllProcessInfo()}
        assert info['slappart1_service-on-watch']['statename'] == 'RUNNING'
        assert info['slappart0_service-on-watch']['pid'] == before
        assert 'slappart2_service-on-watch' not in info
        assert sorted(AsideBook(node).current()) == ['slappart2']
        assert os.path.exists(os.path.join(node.supervisord_conf_dir,
                                           'slappart1.conf'))
    finally:
        server.supervisor.shutdown()


def test_partition_rows_show_programs_and_drop_destroyed_partitions(
        tmp_path):
    node = make_node(tmp_path)
    # slapgrid destroyed slappart2: folder emptied, program file removed.
    part2 = os.path.join(node.instance_root, 'slappart2')
    os.unlink(os.path.join(part2, 'software_release'))
    os.unlink(os.path.join(node.supervisord_conf_dir, 'slappart2.conf'))
    saved = {'partitions': {'slappart2': {'state': 'started'},
                            'slappart1': {'state': 'stopped'}}}
    infos = [{'group': 'slappart0', 'name': 'slappart0_service-on-watch',
              'statename': 'RUNNING'},
             {'group': 'slappart1', 'name': 'slappart1_service-on-watch',
              'statename': 'FATAL'}]
    rows = partition_rows(node, infos, saved,
                          failed={'slappart0': 'its programs did not start'})
    assert [row_line(r) for r in rows] == [
        'slappart0  started   1/1 running',
        'slappart1  stopped   0/1 running  ! not running:'
        ' slappart1_service-on-watch FATAL']


def test_status_tree_shows_each_partition_of_a_degraded_node():
    from slaposha.cli.status import render
    status = {'cluster': 'c', 'etcd': 'ok', 'host': 'hB', 'local': {},
              'services': {'node': {
                  'owner': 'hB', 'token': 7, 'orchestrate': 'ha',
                  'hosts': ['hA', 'hB'],
                  'resources': [['slapos#node', 'warn', 'degraded: x']],
                  'details': {'slapos#node': ['slappart0  started   1/1'
                                              ' running']},
                  'on': {'hB': {'state': 'running'}}}}}
    lines = render(status)
    assert lines[1].startswith('node       warn     on hB (token 7)')
    assert lines[-2:] == ['    slapos#node    warn  degraded: x',
                          '      slappart0  started   1/1 running']


def test_check_without_an_agent_says_how_in_one_line(tmp_path, slaposha_cmd):
    cluster = tmp_path / 'cluster.cfg'
    cluster.write_text('[cluster]\nname = c\nhosts = hA hB hC\n'
                       'run_dir = %s\n[host hA]\naddress = 10.0.0.1\n'
                       '[host hB]\naddress = 10.0.0.2\n[host hC]\n'
                       'address = 10.0.0.3\n' % tmp_path)
    p = subprocess.run(slaposha_cmd + ['-c', str(cluster), 'slapos',
                                       'check'],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    assert p.returncode == 2
    assert p.stderr.count('\n') == 1 and 'Traceback' not in p.stderr
    assert 'agent' in p.stderr, p.stderr


def test_the_first_line_of_status_says_what_is_wrong_and_where():
    from slaposha.cli.status import render
    from slaposha.verdict import problems
    node = {'owner': 'hB', 'token': 7, 'orchestrate': 'ha',
            'hosts': ['hA', 'hB', 'hC'],
            'resources': [['btrfs#slapgrid', 'up', 'hA: 0.3 s old'],
                          ['slapos#node', 'warn', 'degraded: slappart2 set'
                           ' aside since 12:00:01: its folder is missing']],
            'on': {'hB': {'state': 'running'}}}
    web = {'owner': None, 'hosts': ['hA', 'hB'], 'resources': [],
           'on': {'hA': {'state': 'stopped', 'decision': [
               0, 'wait', 'no live host can run it: hB failed it']}}}
    status = {'cluster': 'c', 'etcd': 'ok', 'host': 'hB', 'local': {},
              'hosts': {'hA': {'alive': True, 'ineligible': {
                  'node': 'software release http://x/sr.cfg is missing'}},
                        'hB': {'alive': True, 'failed': ['web']},
                        'hC': {'alive': False},
                        'hW': {'alive': True, 'role': 'witness'}},
              'services': {'node': node, 'web': web},
              'etcd_members': [
                  {'name': 'hA', 'reachable': True},
                  {'name': 'hC', 'reachable': False, 'error': 'refused'},
                  {'name': 'hW', 'reachable': False, 'error': 'timed out'}]}
    first = render(status)[0]
    assert first == (
        'cluster c   etcd ok   (seen from hB)   ! 6 problem(s): host hC down;'
        ' etcd member hW out of reach: timed out; node warn on hB:'
        ' slapos#node degraded: slappart2 set aside since 12:00:01: its'
        ' folder is missing (and 3 more)')
    assert problems(status)[3:] == [
        'node not eligible on hA: software release http://x/sr.cfg is'
        ' missing',
        'web down: no live host can run it: hB failed it',
        'web failed on hB']
    # Stopped on purpose is not a problem; every host back: ok.
    web['target'] = {'state': 'stopped'}
    node['resources'][1][1] = 'up'
    status['hosts']['hA'].pop('ineligible')
    status['hosts']['hC']['alive'] = True
    status['etcd_members'] = [{'name': 'hW', 'reachable': True}]
    assert render(status)[0].endswith(
        '(seen from hB)   ok: 1 of 2 service(s) running, every host alive')
    # Frozen: no failover, said.
    web['frozen'] = {'by': 'admin bob', 'at': 1.0}
    assert problems(status) == [
        'web frozen by admin bob: the agents neither start nor move it']
    # etcd out of reach: said once, nothing claimed fine.
    bad = {'cluster': 'c', 'etcd': 'cannot read the cluster: timeout',
           'host': 'hB', 'local': {}}
    assert render(bad)[0] == 'cluster c   etcd cannot read the cluster:' \
        ' timeout   (seen from hB)'
