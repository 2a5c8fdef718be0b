"""The SlapOS node as it changes, on folders laid out as slapgrid leaves
them (no lab): the fingerprint and what a standby lacks (named by URL)."""

import hashlib
import os
import textwrap

from slaposha.slapos.node import (
    compare, fingerprint, load_node, local_facts, release_url)

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
