"""``app``: a program, or a start/stop/check set of commands.

Either ``command``: a program that runs in the foreground, started and
watched by the agent (as a supervisord program is); or ``start`` (a command
that may leave daemons behind), with ``check`` (exit 0 = up) and ``stop``.
Whatever they start lives in the resource's cgroup, so that stop and fence
find every process, daemons included.

With ``user`` (and ``group``), the commands run as that user, as
supervisord's ``user=`` does: its uid, its primary group (or ``group``) and
its supplementary groups, the agent's environment otherwise. They join the
cgroup as root first, then drop to the user (``setpriv``, util-linux), so
that stop and fence still reach them.
"""

import grp
import os
import pwd
import shutil
import signal
import subprocess
import time

from slaposha.schema import Key
from slaposha.inputs import cut
from slaposha.resources import (
    DOWN, UP, Resource, ResourceError, Status, register)


def account(user, group=None):
    """(uid, gid) of ``user`` (a name or a uid) with ``group`` (a name or
    a gid; default: the user's primary group). KeyError, as one line, for
    one this host does not know."""
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else \
            pwd.getpwnam(user)
    except KeyError:
        raise KeyError('user %s does not exist on this host' % cut(user))
    if not group:
        return entry.pw_uid, entry.pw_gid
    try:
        gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else \
            grp.getgrnam(group).gr_gid
    except KeyError:
        raise KeyError('group %s does not exist on this host' % cut(group))
    return entry.pw_uid, gid


@register
class App(Resource):
    """a program (command) or start/stop/check commands"""

    kind = 'app'
    keys = (
        Key('command', 'string', None, 'program run in the foreground and'
            ' watched by the agent; up while it runs'),
        Key('start', 'string', None, 'command that starts the application'
            ' (it may daemonize); instead of command'),
        Key('stop', 'string', None, 'command that stops it; afterwards'
            ' whatever is left in its cgroup is killed'),
        Key('check', 'string', None, 'command whose exit code 0 means up'
            ' (default: a process of the resource is alive)'),
        Key('timeout', 'duration', 30.0, 'time allowed to start, stop or'
            ' check', minimum=0.1),
        Key('cwd', 'path', None, 'working folder of the commands'),
        Key('user', 'string', None, 'run the commands as this user (a name'
            ' or a uid), with its groups, as supervisord\'s user= (e.g.'
            ' PostgreSQL refuses root); default: as the agent (root)'),
        Key('group', 'string', None, 'primary group of the commands (a name'
            ' or a gid) instead of the user\'s; needs user'),
    )

    @classmethod
    def validate(cls, section):
        if bool(section.command) == bool(section.start):
            return 'needs exactly one of command or start'
        if section.group and not section.user:
            return 'group needs user'
        if section.user:
            try:
                account(section.user, section.group)
            except KeyError as e:
                return e.args[0]
        return None

    def __init__(self, section, context):
        super().__init__(section, context)
        self.proc = None

    def _argv(self, text):
        """The command line of ``text``, joining the resource's cgroup
        first (as root), then becoming ``user``."""
        argv = ['sh', '-c', text]
        if self.conf.user:
            try:
                uid, gid = account(self.conf.user, self.conf.group)
            except KeyError as e:
                raise ResourceError('%s: %s' % (self.rid, e.args[0]))
            setpriv = shutil.which('setpriv')
            if setpriv is None:
                raise ResourceError('%s: user = %s needs setpriv (util-linux)'
                                    ' in PATH' % (self.rid, self.conf.user))
            argv = [setpriv, '--reuid=%d' % uid, '--regid=%d' % gid,
                    '--init-groups', '--'] + argv
        return self.cgroup.wrap(argv)

    def log_path(self):
        """Where the output of the commands goes."""
        return os.path.join(self.context.log_dir, '%s.%s.log' % (
            self.context.name, self.rid.replace('#', '.')))

    def _log(self):
        path = self.log_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return open(path, 'ab')

    def _run(self, text, what):
        log = self._log()
        try:
            args = dict(stdout=log, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL, cwd=self.conf.cwd)
            # A start's command is launched only while the start goes on.
            p = self.launch(self._argv(text), **args) if what == 'start' \
                else subprocess.Popen(self._argv(text), **args)
            try:
                return p.wait(timeout=self.conf.timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                raise ResourceError('%s: %s did not finish within %gs' % (
                    self.rid, what, self.conf.timeout))
        finally:
            log.close()

    def start(self):
        self.cgroup.create()
        if self.conf.command:
            if self.proc is not None and self.proc.poll() is None:
                return
            log = self._log()
            try:
                self.proc = self.launch(
                    self._argv(self.conf.command),
                    stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, cwd=self.conf.cwd,
                    start_new_session=True)
            except OSError as e:
                raise ResourceError('%s: cannot run %s: %s' % (
                    self.rid, self.conf.command, e))
            finally:
                log.close()
            # A program that dies at once is a failed start, not a start.
            time.sleep(0.05)
            if self.proc.poll() is not None:
                raise ResourceError('%s: command exited at once with code %s'
                                    % (self.rid, self.proc.returncode))
            return
        code = self._run(self.conf.start, 'start')
        if code != 0:
            raise ResourceError('%s: start exited with code %d'
                                % (self.rid, code))

    def stop(self):
        if self.conf.stop:
            code = self._run(self.conf.stop, 'stop')
            if code != 0:
                raise ResourceError('%s: stop exited with code %d'
                                    % (self.rid, code))
        elif self.cgroup.exists():
            self.cgroup.signal(signal.SIGTERM)
            deadline = time.monotonic() + self.conf.timeout
            while self.cgroup.pids() and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.02)
        self.cgroup.kill()
        self._reap()
        self.cgroup.remove()

    def _reap(self):
        if self.proc is not None and self.proc.poll() is not None:
            self.proc = None

    def status(self):
        if self.conf.check:
            if not self.cgroup.exists() and self.conf.command:
                return Status(DOWN, 'not started')
            code = self._run(self.conf.check, 'check')
            return Status(UP, 'check passed') if code == 0 else \
                Status(DOWN, 'check exited with code %d' % code)
        pids = self.cgroup.pids() if self.cgroup.exists() else []
        self._reap()
        if pids:
            return Status(UP, '%d process(es)' % len(pids))
        return Status(DOWN, 'no process')
