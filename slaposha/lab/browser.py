"""A real browser in the lab: headless Chromium in a lab host, driven from
the test, and the relay that gives it a client certificate.

:class:`Browser` starts Chromium on a page in a host, driven over the
DevTools protocol on a pipe by a small program in the same host; the test
sends that program one JSON command a line over a unix socket in the lab's
work folder (reachable from every namespace)::

    with Browser(lab['hW'], 'http://127.0.0.1:8443/', lab.workdir) as b:
        b.wait("document.querySelector('[data-state=ok]')", 20)
        b.eval("document.querySelector('button').click()")
        b.shot('/tmp/page.png')

Chromium has no client certificate: :func:`relay` runs, in a host, a
TLS-terminating relay whose plain connections on 127.0.0.1 become TLS
connections to a server with the certificate of a folder (``operator.crt``,
``operator.key`` and the server's ``ca.crt``).

Chromium runs with the flags this machine needs (no sandbox, GPU, QUIC,
first-run, background networking, component updates or sync) and a new
empty profile, removed after.
"""

import json
import os
import shutil
import socket
import sys
import textwrap
import time

from slaposha.lab import LabError, wait_for

__all__ = ['Browser', 'relay', 'CHROMIUM_FLAGS']

CHROMIUM_FLAGS = ('--headless', '--no-sandbox', '--disable-gpu',
                  '--disable-quic', '--no-first-run',
                  '--disable-background-networking',
                  '--disable-component-update', '--disable-sync',
                  '--hide-scrollbars')

# Runs in a host: Chromium on URL, driven over the DevTools protocol on a
# pipe (fds 3 and 4, NUL-ended JSON); commands come one JSON line at a time
# on the unix socket SOCK: {"op": "eval"|"wait"|"shot"|"quit", ...}.
DRIVER = textwrap.dedent('''\
    import base64, json, os, shutil, socket, subprocess, sys, tempfile, time
    url, sock_path, size, flags = sys.argv[1], sys.argv[2], sys.argv[3], \\
        sys.argv[4:]
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    profile = tempfile.mkdtemp(prefix='chromium-')
    proc = subprocess.Popen(
        ['sh', '-c', 'exec "$@" 3<&%d 4>&%d' % (to_r, from_w), 'sh',
         'chromium'] + flags + ['--remote-debugging-pipe',
                                '--user-data-dir=' + profile,
                                '--window-size=' + size, url],
        pass_fds=(to_r, from_w), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env=dict(os.environ, HOME=profile))
    os.close(to_r)
    os.close(from_w)
    pending, count = [b''], [0]

    class Failed(Exception):
        pass

    def call(method, params=None, session=None):
        count[0] += 1
        message = {'id': count[0], 'method': method, 'params': params or {}}
        if session:
            message['sessionId'] = session
        os.write(to_w, json.dumps(message).encode() + b'\\0')
        while True:
            while b'\\0' not in pending[0]:
                chunk = os.read(from_r, 1 << 20)
                if not chunk:
                    raise SystemExit('chromium ended')
                pending[0] += chunk
            raw, pending[0] = pending[0].split(b'\\0', 1)
            answer = json.loads(raw)
            if answer.get('id') == count[0]:
                if 'error' in answer:
                    raise Failed('%s: %s' % (method, answer['error']))
                return answer['result']

    def evaluate(expression):
        result = call('Runtime.evaluate', {'expression': expression,
                                           'returnByValue': True}, session)
        if 'exceptionDetails' in result:
            raise Failed('%s: %s' % (expression[:80], result[
                'exceptionDetails'].get('exception', {}).get(
                    'description') or result['exceptionDetails']['text']))
        return result['result'].get('value')

    def where():
        try:
            return evaluate("location.href + ' ' + JSON.stringify("
                            "document.title) + ' ' + (document.body ?"
                            " document.body.innerText.slice(0, 200) : '')")
        except Failed as e:
            return str(e)

    try:
        deadline = time.time() + 20
        page = None
        while page is None and time.time() < deadline:
            page = next((t['targetId'] for t in call('Target.getTargets')
                         ['targetInfos'] if t['type'] == 'page'), None)
        if page is None:
            raise SystemExit('chromium opened no page')
        session = call('Target.attachToTarget', {'targetId': page,
                                                 'flatten': True})['sessionId']
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(sock_path)
        server.listen(1)
        print('driving', flush=True)
        conn, _ = server.accept()
        stream = conn.makefile('rwb')
        for line in stream:
            request = json.loads(line)
            op = request['op']
            try:
                if op == 'quit':
                    break
                if op == 'eval':
                    value = evaluate(request['js'])
                elif op == 'wait':
                    # An error (the page not there yet) is a "not yet". A
                    # page that could not load (its server not listening
                    # yet, under load) is loaded again every 2 s.
                    end = time.time() + request['timeout']
                    value = why = None
                    retry = time.time() + 2
                    while not value:
                        if time.time() > end:
                            raise Failed('not after %ss: %s%s; the page: %s' % (
                                request['timeout'], request['js'],
                                ' (%s)' % why if why else '', where()))
                        try:
                            value = evaluate(request['js'])
                        except Failed as e:
                            why = e
                        if not value:
                            if time.time() > retry:
                                retry = time.time() + 2
                                if where().startswith('chrome-error:'):
                                    call('Page.navigate', {'url': url},
                                         session)
                            time.sleep(0.2)
                elif op == 'shot':
                    png = call('Page.captureScreenshot', {'format': 'png'},
                               session)['data']
                    with open(request['path'], 'wb') as f:
                        f.write(base64.b64decode(png))
                    value = request['path']
                answer = {'ok': True, 'value': value}
            except Failed as e:
                answer = {'ok': False, 'error': str(e)}
            stream.write(json.dumps(answer).encode() + b'\\n')
            stream.flush()
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
''')

# Runs in a host: plain connections on 127.0.0.1:PORT become TLS
# connections to HOST:TARGET_PORT with the client certificate of CERTS.
RELAY = textwrap.dedent('''\
    import socket, ssl, sys, threading
    port, host, api_port, certs = sys.argv[1:5]
    ctx = ssl.create_default_context(cafile=certs + '/ca.crt')
    ctx.load_cert_chain(certs + '/operator.crt', certs + '/operator.key')
    def pipe(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    def serve(conn):
        try:
            up = ctx.wrap_socket(socket.create_connection(
                (host, int(api_port))), server_hostname=host)
        except OSError:
            conn.close()
            return
        threading.Thread(target=pipe, args=(conn, up), daemon=True).start()
        pipe(up, conn)
    server = socket.create_server(('127.0.0.1', int(port)))
    print('relaying', flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()
''')


def _script(folder, name, text):
    path = os.path.join(folder, name)
    with open(path, 'w') as f:
        f.write(text)
    return path


def _started(proc, word, what, timeout=30):
    def ready():
        if proc.poll() is not None:
            with open(proc.log_path, errors='replace') as f:
                raise LabError('%s ended: %s' % (what, f.read()[-500:]))
        with open(proc.log_path, errors='replace') as f:
            return word in f.read()
    wait_for(ready, timeout, interval=0.1, what=what)


def relay(host, port, target, target_port, certs, env=None):
    """Start the relay in ``host`` (127.0.0.1:``port`` to ``target``, an
    address, with the certificate of folder ``certs``); returns the Popen
    (kill it when done)."""
    script = _script(host.lab.workdir, 'relay.py', RELAY)
    proc = host.spawn([sys.executable, script, str(port), target,
                       str(target_port), certs], name='relay-%d' % port,
                      env=env)
    try:
        _started(proc, 'relaying', 'the relay in %s' % host.name)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


class BrowserError(LabError):
    """A command the page did not satisfy, as one line."""


class Browser(object):
    """Headless Chromium on ``url`` in lab host ``host``."""

    def __init__(self, host, url, workdir, env=None, size='1200,900'):
        if shutil.which('chromium') is None:
            raise LabError('no chromium (tools/setup.sh installs it)')
        script = _script(workdir, 'browser.py', DRIVER)
        self.sock_path = os.path.join(workdir, 'browser-%d.sock'
                                      % int(time.time() * 1000))
        self.proc = host.spawn([sys.executable, script, url, self.sock_path,
                                size] + list(CHROMIUM_FLAGS),
                               name='browser', env=env)
        self.sock = None
        try:
            _started(self.proc, 'driving', 'chromium in %s' % host.name, 60)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(self.sock_path)
            self.stream = self.sock.makefile('rwb')
        except BaseException:
            self.close()
            raise

    def _call(self, budget, **request):
        self.sock.settimeout(budget + 30)
        self.stream.write(json.dumps(request).encode() + b'\n')
        self.stream.flush()
        line = self.stream.readline()
        if not line:
            raise LabError('the browser driver ended: %s'
                           % open(self.proc.log_path).read()[-500:])
        answer = json.loads(line)
        if not answer['ok']:
            raise BrowserError(answer['error'])
        return answer['value']

    def eval(self, js):
        """The value of the JavaScript expression ``js`` in the page."""
        return self._call(10, op='eval', js=js)

    def wait(self, js, timeout=20):
        """Wait until ``js`` is true in the page; its value."""
        return self._call(timeout, op='wait', js=js, timeout=timeout)

    def dom(self):
        return self.eval('document.documentElement.outerHTML')

    def shot(self, path):
        """A PNG of the page (``path`` as the browser's host sees it)."""
        return self._call(20, op='shot', path=path)

    def close(self):
        if self.sock is not None:
            try:
                self.stream.write(b'{"op": "quit"}\n')
                self.stream.flush()
            except OSError:
                pass
            self.sock.close()
            self.sock = None
        try:
            self.proc.wait(10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        try:
            os.unlink(self.sock_path)
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
