"""adopt's pieces without a lab: the cron entries that run a node, disabled
and brought back as they were; slapos.cfg changed by one line; the format
definition that pins what .slapos-resource says."""

import json
import os
import subprocess

from slaposha.slapos import cron
from slaposha.slapos.adopt import _definition, _pinned, processes_in
from slaposha.slapos.files import set_key
from slaposha.slapos.node import load_node

CRON = '''SHELL=/bin/sh
PATH=/usr/bin:/usr/sbin:/sbin:/bin
MAILTO=root

* * * * * root /opt/slapos/bin/slapos node software --verbose
* * * * * root /opt/slapos/bin/slapos node instance --verbose
SLAPOS_REPORT_COMMAND="/opt/slapos/bin/slapos node report --maximal_delay=3600"
0 * * * * root $SLAPOS_REPORT_COMMAND
0 * * * * root /opt/slapos/bin/slapos node format >> /opt/slapos/f.log 2>&1
@reboot root /opt/slapos/bin/slapos node boot
*/5 * * * * root /usr/bin/something-else
'''


def test_cron_entries_disabled_then_back_as_they_were(tmp_path):
    (tmp_path / 'slapos-node').write_text(CRON)
    os.chmod(tmp_path / 'slapos-node', 0o640)
    (tmp_path / 'other.dpkg-old').write_text('* * * * * root slapos node x\n')
    found = cron.entries(str(tmp_path), None)
    assert [(e.line, e.timing) for e in found] == [
        (5, '* * * * *'), (6, '* * * * *'), (8, '0 * * * *'),
        (9, '0 * * * *'), (10, '@reboot')]
    # The variable of the file is expanded, as cron's shell would.
    assert found[2].command == '/opt/slapos/bin/slapos node report' \
        ' --maximal_delay=3600'
    assert cron.disable(found) == 5
    text = (tmp_path / 'slapos-node').read_text()
    assert text.count(cron.MARK) == 5 and 'something-else' in text
    assert oct(os.stat(tmp_path / 'slapos-node').st_mode & 0o777) == '0o640'
    again = cron.entries(str(tmp_path), None)
    assert all(e.disabled for e in again) and len(again) == 5
    assert cron.disable(again) == 0  # idempotent
    assert cron.enable(again) == 5
    assert (tmp_path / 'slapos-node').read_text() == CRON
    assert cron.enable(cron.entries(str(tmp_path), None)) == 0


def test_cron_timings_become_task_schedules():
    assert cron.every('* * * * *') == 60
    assert cron.every('*/5 * * * *') == 300
    assert cron.every('0 * * * *') == 3600
    assert cron.every('0 */2 * * *') == 7200
    assert cron.every('30 3 * * *') == 86400
    assert cron.every('@hourly') == 3600
    assert cron.every('@reboot') is None  # `node boot` never under an agent


def test_one_key_of_slapos_cfg_changes_the_rest_stays(tmp_path):
    cfg = tmp_path / 'slapos.cfg'
    text = ('[slapos]\n# the node\ncomputer_id = COMP-1\n\n[slapformat]\n'
            'interface_name = lo\n# keep me\n\n[networkcache]\nx = 1\n')
    cfg.write_text(text)
    set_key(str(cfg), 'slapformat', 'input_definition_file', '/d.cfg')
    assert cfg.read_text() == text.replace(
        '# keep me\n\n[networkcache]',
        '# keep me\n\ninput_definition_file = /d.cfg\n[networkcache]')
    set_key(str(cfg), 'slapformat', 'input_definition_file', '/e.cfg')
    assert 'input_definition_file = /e.cfg\n' in cfg.read_text()
    set_key(str(cfg), 'slapformat', 'input_definition_file', None)
    assert cfg.read_text() == text
    cfg.write_text('[slapos]\ncomputer_id = C\n')
    set_key(str(cfg), 'slapformat', 'input_definition_file', '/d.cfg')
    assert cfg.read_text() == '[slapos]\ncomputer_id = C\n\n[slapformat]\n' \
        'input_definition_file = /d.cfg\n'


def test_the_definition_pins_what_format_recorded(tmp_path):
    root = tmp_path / 'srv'
    for n, (v4, v6) in enumerate([('10.0.0.7', 'fd00::7'),
                                  ('10.0.0.9', 'fd00::9')]):
        part = root / ('slappart%d' % n)
        part.mkdir(parents=True)
        (part / '.slapos-resource').write_text(json.dumps({
            'user': {'name': 'slapuser%d' % n},
            'address_list': [{'addr': v4, 'netmask': '255.255.255.255'},
                             {'addr': v6, 'netmask': 'ffff:ffff::'}],
            'ipv6_range': {'network': 'fd00:%d::/80' % n},
            'tap': {'name': 'slaptap%d' % n}}))
    cfg = tmp_path / 'slapos.cfg'
    cfg.write_text('[slapos]\ncomputer_id = C\ninstance_root = %s\n'
                   'software_root = /opt/slapgrid\n[slapformat]\n'
                   'interface_name = eth0\n' % root)
    text = _definition(load_node(str(cfg)))
    assert '[partition_1]\naddress = 10.0.0.9/255.255.255.255' \
        ' fd00::9/ffff:ffff::\nuser = slapuser1\npathname = slappart1\n' \
        'network_interface = slaptap1\nipv6_range = fd00:1::/80\n' in text
    (tmp_path / 'd.cfg').write_text(text)
    assert _pinned(str(tmp_path / 'd.cfg')) == {
        'slappart0': ['10.0.0.7/255.255.255.255', 'fd00::7/ffff:ffff::'],
        'slappart1': ['10.0.0.9/255.255.255.255', 'fd00::9/ffff:ffff::']}


def _node(tmp_path):
    """A formatted node in tmp_path (not on btrfs), its cron file and a
    cluster file of two hosts."""
    root = tmp_path / 'srv' / 'slapgrid'
    part = root / 'slappart0'
    part.mkdir(parents=True)
    (part / '.slapos-resource').write_text(json.dumps({
        'user': {'name': 'slapuser0'},
        'address_list': [{'addr': '10.0.0.7', 'netmask': '255.255.255.255'}]
    }))
    etc = tmp_path / 'etc'
    etc.mkdir()
    (etc / 'slapos.cfg').write_text(
        '[slapos]\ncomputer_id = COMP-42\ninstance_root = %s\n'
        'software_root = %s\nmaster_url = http://127.0.0.1:9\n'
        '[slapformat]\ninterface_name = lo\n' % (root, tmp_path / 'opt'))
    (tmp_path / 'cron.d').mkdir()
    (tmp_path / 'cron.d' / 'slapos-node').write_text(CRON)
    (tmp_path / 'cluster.cfg').write_text(
        '[cluster]\nname = c\nhosts = hA hB\nwitnesses = hW\ntls = true\n'
        '[host hA]\naddress = 10.0.0.1\n[host hB]\naddress = 10.0.0.2\n'
        '[host hW]\naddress = 10.0.0.3\n')
    from slaposha.config import load_cluster
    return str(etc / 'slapos.cfg'), load_cluster(str(tmp_path /
                                                     'cluster.cfg'))


def test_the_plan_says_how_to_get_the_data_onto_btrfs_and_changes_nothing(
        tmp_path):
    from slaposha.slapos.adopt import AdoptError, Adoption
    cfg, cluster = _node(tmp_path)
    adoption = Adoption(cfg, cluster, 'hA', cron_dir=str(tmp_path /
                                                         'cron.d'))
    assert adoption.name == 'comp-42' and adoption.hosts == ['hA', 'hB']
    plan = '\n'.join(adoption.plan())
    assert 'the partitions\' addresses: 10.0.0.7/32 on lo' in plan
    assert '5 cron entries that run `slapos node` disabled' in plan
    assert 'mkfs.btrfs DEVICE' in plan and '--convert' in plan
    service = adoption.service_text()
    assert '[task#instance]\ncommand = /opt/slapos/bin/slapos node instance' \
        ' --verbose\nschedule = 1m\n' in service
    assert '[task#report]' in service and '[task#boot]' not in service
    try:
        adoption.apply()
    except AdoptError as e:
        assert 'slaposha slapos adopt --apply --convert' in str(e)
    else:
        raise AssertionError('adopted a node whose data is not on btrfs')
    assert (tmp_path / 'cron.d' / 'slapos-node').read_text() == CRON
    assert not os.path.exists(tmp_path / 'etc' / 'slaposha-adopt.json')


def test_release_refuses_a_node_that_was_not_adopted(tmp_path):
    from slaposha.slapos.adopt import AdoptError
    from slaposha.slapos.release import release
    cfg, cluster = _node(tmp_path)
    try:
        release(cfg, cluster, 'hA', cron_dir=str(tmp_path / 'cron.d'))
    except AdoptError as e:
        assert str(e) == '%s: no slaposha-adopt.json: this node was not' \
            ' adopted (or its identity is not on this host)' % (
                tmp_path / 'etc')
    else:
        raise AssertionError('released a node that was not adopted')


def test_a_bad_fingerprint_is_one_line(tmp_path):
    from slaposha.slapos.standby import Preparation, PrepareError
    for ref, line in (
            ([], 'top level: expected a JSON object'),
            ({'instance_root': 'srv'}, 'instance_root: expected an absolute'
             ' path'),
            ({'instance_root': '/srv/slapgrid', 'software_root': '/opt/s',
              'users': {'slapuser0': 'x'}}, 'users: slapuser0: expected'
             ' [uid, gid]')):
        try:
            Preparation(ref, str(tmp_path / 'slapos.cfg'),
                        cron_dir=str(tmp_path))
        except PrepareError as e:
            assert str(e) == 'the fingerprint\'s %s (is it the output of' \
                ' `slaposha slapos fingerprint`?)' % line
        else:
            raise AssertionError('took %r' % ref)


def test_a_process_using_the_instance_root_is_found(tmp_path):
    # What keeps --convert from copying a node that still runs: a program
    # with its working folder there, or a file open there.
    root = tmp_path / 'srv' / 'slapgrid'
    (root / 'slappart0').mkdir(parents=True)
    assert processes_in(str(root)) == []
    inside = subprocess.Popen(['sleep', '60'], cwd=str(root / 'slappart0'))
    log = open(str(root / 'supervisord.log'), 'w')
    holder = subprocess.Popen(['sleep', '60'], stdout=log, cwd='/')
    try:
        found = processes_in(str(root), limit=10)
        assert (inside.pid, 'sleep') in found and \
            (holder.pid, 'sleep') in found, found
        # A folder whose name only begins like it is not inside.
        assert processes_in(str(root) + '-old') == []
    finally:
        for p in (inside, holder):
            p.kill()
            p.wait()
        log.close()
    assert processes_in(str(root)) == []


# systemd cannot run here (it is not PID 1, in the lab or on this machine):
# a stand-in for systemctl that keeps one unit's state in two files and
# logs its calls, as `systemctl is-enabled | is-active | enable | disable`
# answer and act.
FAKE_SYSTEMCTL = '''#!/bin/sh
d=$(dirname "$0")
echo "$*" >> "$d/calls"
case "$1" in
is-enabled) cat "$d/enabled" ;;
is-active) cat "$d/active" ;;
disable) echo disabled > "$d/enabled"
         [ "$2" = --now ] && echo inactive > "$d/active" ;;
enable) echo enabled > "$d/enabled"
        [ "$2" = --now ] && echo active > "$d/active" ;;
esac
exit 0
'''


def test_the_hosts_own_re6st_daemon_is_disabled_then_back(tmp_path):
    from slaposha.slapos.adopt import Adoption, read_state
    from slaposha.slapos.release import unit_back
    from slaposha.slapos.systemd import Units
    cfg, cluster = _node(tmp_path)
    re6st = tmp_path / 're6stnet'
    re6st.mkdir()
    (re6st / 're6stnet.conf').write_text('registry http://re6st.example/\n')
    bin_ = tmp_path / 'bin'
    bin_.mkdir()
    (bin_ / 'systemctl').write_text(FAKE_SYSTEMCTL)
    os.chmod(bin_ / 'systemctl', 0o755)
    (bin_ / 'enabled').write_text('enabled\n')
    (bin_ / 'active').write_text('active\n')
    units = Units(str(bin_ / 'systemctl'))

    def adoption():
        return Adoption(cfg, cluster, 'hA', cron_dir=str(tmp_path / 'cron.d'),
                        re6st_config=str(re6st), units=units)
    plan = '\n'.join(adoption().plan())
    assert '[    ] re6stnet.service (this host\'s own re6st daemon) stopped' \
        ' and disabled: the agent runs the node\'s daemon where the node' \
        ' runs (it is enabled, active)' in plan
    assert 'disable' not in (bin_ / 'calls').read_text()  # a plan only
    first = adoption()
    first._do_state()
    assert first._do_re6st_unit() == 're6stnet.service stopped and' \
        ' disabled (it was enabled, active)'
    assert (bin_ / 'calls').read_text().splitlines()[-1] == \
        'disable --now re6stnet.service'
    assert '[done] re6stnet.service' in '\n'.join(adoption().plan())
    # A second run keeps what the unit was before the first.
    again = adoption()
    again._do_re6st_unit()
    state = read_state(str(tmp_path / 'etc'))
    assert state['re6st_unit'] == 'enabled'
    # release: enabled and started again; then nothing left to do.
    assert unit_back(state, units) is units
    units.enable('re6stnet.service')
    assert (bin_ / 'active').read_text() == 'active\n'
    assert unit_back(state, units) is None
    # A unit that was off before adopt stays off.
    assert unit_back(dict(state, re6st_unit='disabled'), units) is None
    # No such unit here: no step at all.
    (bin_ / 'enabled').write_text('not-found\n')
    assert 're6stnet.service' not in '\n'.join(adoption().plan())
