"""``slaposha slapos prepare-standby``: a peer made ready to take a node
over, from its owner's fingerprint.

The fingerprint (:func:`slaposha.slapos.node.fingerprint`) says what a
standby must have the same: paths, numeric uids and gids, software
releases, interfaces. ``slaposha slapos fingerprint`` adds what a peer
needs to be prepared (:func:`reference`): each account's group, home and
other groups, the groups' ids, the node's slapos.cfg and its SlapOS
install. :class:`Preparation` compares this host with it and, step by step
(each idempotent), does what can be done here:

- the cron entries that run `slapos node` on this host disabled (a standby
  never runs slapgrid: only the owner does, as tasks of the service);
- the groups and users created with the same gids and uids (as `slapos node
  format` creates them: a system account, its own group, the software
  user's group besides, a locked password);
- slapos.cfg written where the owner has it, when this host has none (the
  node's identity comes with the data at takeover), software_root made;

and says what it cannot do itself: another SlapOS install or version, an
account or id that differs, instance_root's parent not on btrfs (or a
folder of this host's own at instance_root), a missing interface. The
software releases come from the owner's agent once the service runs.
"""

import configparser
import grp
import os
import pwd
import subprocess

from slaposha.slapos import cron
from slaposha.slapos.files import write_atomic
from slaposha.slapos.adopt import (
    data_state, slapos_command, slapos_version)
from slaposha.slapos.node import (
    NodeError, compare, fingerprint, load_node, local_facts)

__all__ = ['reference', 'Preparation', 'PrepareError']


class PrepareError(Exception):
    """The reference cannot be used, as one line."""


def _account(name):
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    group = grp.getgrgid(entry.pw_gid).gr_name if _gid_name(
        entry.pw_gid) else None
    others = sorted(g.gr_name for g in grp.getgrall()
                    if name in g.gr_mem and g.gr_gid != entry.pw_gid)
    return {'home': entry.pw_dir, 'group': group, 'groups': others,
            'shell': entry.pw_shell}


def _gid_name(gid):
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def reference(node):
    """The fingerprint, with what preparing a peer needs besides."""
    found = fingerprint(node)
    accounts, groups = {}, {}
    for user in found['users']:
        account = _account(user)
        if account is None:
            continue
        accounts[user] = account
        for name in [account['group']] + account['groups']:
            if name:
                groups[name] = grp.getgrnam(name).gr_gid
    found['accounts'] = accounts
    found['groups'] = groups
    with open(node.config_path) as f:
        found['slapos_cfg'] = {'path': node.config_path, 'text': f.read()}
    command = slapos_command(cron.entries())
    found['slapos'] = {'command': command,
                       'version': slapos_version(command)}
    return found


def _run(args):
    p = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       universal_newlines=True)
    if p.returncode:
        raise PrepareError('%s: %s' % (' '.join(args),
                                       p.stdout.strip()[-300:]))


class Preparation(object):
    """This host against ``ref`` (from :func:`reference`, read from the
    owner): ``todo`` the steps it takes, ``cannot`` what it cannot do."""

    def __init__(self, ref, cfg=None, cron_dir=cron.CRON_DIR,
                 crontab=cron.CRONTAB):
        _check(ref)
        self.ref = ref
        self.cfg = cfg or (ref.get('slapos_cfg') or {}).get('path') or \
            '/etc/opt/slapos/slapos.cfg'
        self.cron_dir, self.crontab = cron_dir, crontab
        self.todo, self.cannot = [], []
        self._look()

    def _look(self):
        entries = [e for e in cron.entries(self.cron_dir, self.crontab)
                   if not e.disabled]
        if entries:
            self.todo.append(('cron', '%d cron entr%s that run `slapos node`'
                              ' disabled (%s): a standby never runs slapgrid'
                              % (len(entries), 'y' if len(entries) == 1
                                 else 'ies', ', '.join(sorted(
                                     {e.path for e in entries}))), entries))
        self._accounts()
        self._files()
        self._install()

    def _accounts(self):
        ref = self.ref
        for name, gid in sorted((ref.get('groups') or {}).items()):
            here = _gid_name(gid)
            try:
                mine = grp.getgrnam(name).gr_gid
            except KeyError:
                mine = None
            if mine == gid:
                continue
            if mine is not None:
                self.cannot.append('group %s has gid %d here but %d on the'
                                   ' owner: give it the same gid (groupmod'
                                   ' -g %d %s, then chgrp what it owns)' % (
                                       name, mine, gid, gid, name))
            elif here is not None:
                self.cannot.append('gid %d of group %s is group %s here:'
                                   ' free it' % (gid, name, here))
            else:
                self.todo.append(('group', 'group %s with gid %d' % (
                    name, gid), (name, gid)))
        accounts = ref.get('accounts') or {}
        for user, ids in sorted((ref.get('users') or {}).items()):
            if not ids:
                continue
            uid, gid = ids
            try:
                mine = pwd.getpwnam(user)
            except KeyError:
                mine = None
            if mine is not None:
                if (mine.pw_uid, mine.pw_gid) != (uid, gid):
                    self.cannot.append(
                        'user %s has uid %d gid %d here but uid %d gid %d on'
                        ' the owner: give it the same ids (usermod -u %d -g'
                        ' %d %s, then chown what it owns)' % (
                            user, mine.pw_uid, mine.pw_gid, uid, gid, uid,
                            gid, user))
                continue
            try:
                taken = pwd.getpwuid(uid).pw_name
            except KeyError:
                taken = None
            if taken is not None:
                self.cannot.append('uid %d of user %s is user %s here: free'
                                   ' it' % (uid, user, taken))
                continue
            account = accounts.get(user) or {}
            self.todo.append(('user', 'user %s with uid %d gid %d%s' % (
                user, uid, gid, ', also in %s' % ' '.join(account['groups'])
                if account.get('groups') else ''), (user, uid, gid,
                                                     account)))

    def _files(self):
        ref = self.ref
        text = (ref.get('slapos_cfg') or {}).get('text')
        if os.path.exists(self.cfg):
            try:
                node = load_node(self.cfg)
                if node.computer_id != ref.get('computer_id'):
                    self.cannot.append(
                        '%s here is node %s, not %s: a standby must not be a'
                        ' node of its own (move its slapos.cfg away)' % (
                            self.cfg, node.computer_id,
                            ref.get('computer_id')))
            except NodeError as e:
                self.cannot.append(str(e))
        elif text:
            self.todo.append(('cfg', '%s as on the owner (the node\'s'
                              ' identity comes with the data at takeover)'
                              % self.cfg, text))
        else:
            self.cannot.append('%s is missing: copy it from the owner'
                               % self.cfg)
        software_root = ref.get('software_root')
        if software_root and not os.path.isdir(software_root):
            self.todo.append(('folder', software_root, software_root))
        root = ref['instance_root']
        kind, detail = data_state(root)
        if kind == 'folder':
            self.cannot.append('%s is a folder of this host: the node\'s'
                               ' data arrives as btrfs snapshots and takes'
                               ' that place at takeover: move it away (mv %s'
                               ' %s.before-slaposha)' % (root, root, root))
        elif kind == 'elsewhere' and detail != 'missing':
            self.cannot.append('%s: %s: its parent folder must be on a btrfs'
                               ' file system, as on the owner (mkfs.btrfs'
                               ' DEVICE; mount DEVICE %s)' % (
                                   root, detail, os.path.dirname(root)))
        elif detail == 'missing':
            from slaposha.replication import ReplicationError
            from slaposha.replication.volume import Volume
            try:
                Volume(root).root
            except ReplicationError as e:
                self.cannot.append('%s: its parent folder must be on a btrfs'
                                   ' file system, as on the owner (mkfs.btrfs'
                                   ' DEVICE; mount DEVICE %s): %s' % (
                                       root, os.path.dirname(root),
                                       str(e).split(': ', 1)[-1]))
        for dev in ref.get('interfaces') or []:
            if not os.path.exists('/proc/sys/net/ipv4/conf/%s' % dev):
                self.cannot.append('interface %s (the partitions\' addresses)'
                                   ' is missing: create it as on the owner'
                                   % dev)

    def _install(self):
        want = self.ref.get('slapos') or {}
        command = want.get('command')
        if not command:
            return
        if not os.path.exists(command):
            self.cannot.append('SlapOS is not installed as on the owner: %s'
                               ' is missing (install slapos.core %s at the'
                               ' same place)' % (command, want.get('version')
                                                 or ''))
            return
        mine = slapos_version(command)
        if want.get('version') and mine != want['version']:
            self.cannot.append('SlapOS here is slapos.core %s, %s on the'
                               ' owner: install the same version' % (
                                   mine, want['version']))

    # -- doing it --------------------------------------------------------------

    def lines(self):
        out = ['prepare this host as a standby of %s' % self.ref.get(
            'computer_id')]
        out += ['  [    ] %s' % text for _, text, _ in self.todo]
        out += ['  [ !! ] %s' % text for text in self.cannot]
        if not self.todo and not self.cannot:
            out.append('  nothing to do')
        return out

    def apply(self):
        done = []
        for kind, text, what in self.todo:
            getattr(self, '_do_' + kind)(what)
            done.append(text)
        return done

    def _do_cron(self, entries):
        cron.disable(entries)

    def _do_group(self, what):
        name, gid = what
        _run(['groupadd', '-g', str(gid), name])

    def _do_user(self, what):
        user, uid, gid, account = what
        args = ['useradd', '-r', '-u', str(uid), '-g', str(gid), '-M',
                '-s', account.get('shell') or '/bin/sh']
        if account.get('home'):
            args += ['-d', account['home']]
        others = [g for g in account.get('groups') or []
                  if _gid_exists(g)]
        if others:
            args += ['-G', ','.join(others)]
        _run(args + [user])

    def _do_cfg(self, text):
        os.makedirs(os.path.dirname(self.cfg), mode=0o755, exist_ok=True)
        write_atomic(self.cfg, text)

    def _do_folder(self, path):
        os.makedirs(path, mode=0o755, exist_ok=True)
        owner = (self.ref.get('users') or {}).get(
            _software_user(self.ref))
        if owner:
            os.chown(path, owner[0], owner[1])

    def check(self):
        """What ``slaposha slapos check`` says now: one line per problem."""
        try:
            node = load_node(self.cfg)
        except NodeError as e:
            return [str(e)]
        return compare(self.ref, local_facts(node, self.ref))


def _check(ref):
    """One line naming what is wrong in a fingerprint, if anything."""
    def bad(field, expected):
        raise PrepareError('the fingerprint\'s %s: expected %s (is it the'
                           ' output of `slaposha slapos fingerprint`?)' % (
                               field, expected))
    if not isinstance(ref, dict):
        bad('top level', 'a JSON object')
    for key in ('instance_root', 'software_root'):
        if not isinstance(ref.get(key), str) or not ref[key].startswith('/'):
            bad(key, 'an absolute path')
    for user, ids in (ref.get('users') or {}).items():
        if ids is not None and not (isinstance(ids, list) and len(ids) == 2
                                    and all(isinstance(i, int) for i in ids)):
            bad('users: %s' % user, '[uid, gid]')
    for group, gid in (ref.get('groups') or {}).items():
        if not isinstance(gid, int):
            bad('groups: %s' % group, 'a gid')
    for user, account in (ref.get('accounts') or {}).items():
        if not isinstance(account, dict) or not isinstance(
                account.get('groups', []), list):
            bad('accounts: %s' % user, '{"home", "group", "groups": [...]}')
    for key in ('slapos_cfg', 'slapos'):
        if not isinstance(ref.get(key) or {}, dict):
            bad(key, 'an object')


def _gid_exists(name):
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def _software_user(ref):
    text = (ref.get('slapos_cfg') or {}).get('text') or ''
    config = configparser.ConfigParser(interpolation=None)
    try:
        config.read_string(text)
    except configparser.Error:
        return 'slapsoft'
    return config.get('slapformat', 'software_user', fallback='slapsoft')
