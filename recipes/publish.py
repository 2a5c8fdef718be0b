"""``slaposha:publish``: the instance's connection parameters, sent to the
SlapOS master and kept in a JSON file of the partition.

Options:

``url``, ``computer``, ``partition``, ``key``, ``cert``
    how to reach the master (``[slap-connection]``); with no ``url`` only
    the file is written.
``file``
    the JSON file of what was published (default
    .slaposha-connection.json in the buildout directory).
``agent-socket``
    the agent's unix socket: when it answers, ``status`` is its one-line
    summary of the cluster; before the agent runs (the first deployment:
    slapgrid starts services after buildout), ``status`` says so.

Every other option that is not empty is a connection parameter, e.g.
``api-url``.
"""

import json
import os

__all__ = ['Recipe', 'summary']

OWN_OPTIONS = ('recipe', 'url', 'computer', 'partition', 'key', 'cert',
               'file', 'agent-socket')


def summary(status):
    """One line for a /status answer: where each service runs, and why
    this agent runs none if it cannot."""
    from slaposha.verdict import service_state
    services = status.get('services')
    head = 'cluster %s seen from %s' % (status.get('cluster'),
                                        status.get('host'))
    cannot_run = (status.get('local') or {}).get('cannot_run')
    tail = '; this agent %s' % cannot_run if cannot_run else ''
    if services is None:
        return '%s: etcd out of reach (%s)%s' % (head, status.get('etcd'),
                                                 tail)
    parts = []
    for name, svc in sorted(services.items()):
        parts.append('%s %s%s' % (name, service_state(svc), ' on %s'
                                  % svc['owner'] if svc.get('owner') else ''))
    return '%s: %s%s' % (head, ', '.join(parts) or 'no service', tail)


class Recipe(object):

    def __init__(self, buildout, name, options):
        self.name = name
        self.options = options
        options.setdefault('file', os.path.join(
            buildout['buildout']['directory'], '.slaposha-connection.json'))

    def connection(self):
        # An empty option publishes nothing: a section that inherits (<=)
        # another one empties what does not apply to it.
        found = {k: v for k, v in self.options.items()
                 if k not in OWN_OPTIONS and not k.startswith('_')
                 and v.strip()}
        sock = self.options.get('agent-socket', '').strip()
        if sock:
            from slaposha.api.local import AgentUnreachable, call
            try:
                status, answer = call(sock, 'GET', '/status')
                found['status'] = summary(answer) if status < 400 else \
                    'agent answered %d: %s' % (status, answer.get('error'))
            except AgentUnreachable:
                found['status'] = 'agent starting: not answering yet on %s' \
                    % sock
        return found

    def install(self):
        found = self.connection()
        path = self.options['file']
        tmp = path + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(found, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
        url = self.options.get('url', '').strip()
        if url:
            self._send(url, found)
        return [path]

    update = install

    def _send(self, url, found):
        import zc.buildout
        from slapos import slap
        try:
            connection = slap.slap()
            connection.initializeConnection(
                url, key_file=self.options.get('key') or None,
                cert_file=self.options.get('cert') or None)
            connection.registerComputerPartition(
                self.options['computer'], self.options['partition']
            ).setConnectionDict(found)
        except Exception as e:  # requests, slap and marshalling errors alike
            raise zc.buildout.UserError(
                '[%s] url: cannot publish the connection parameters to %s:'
                ' %s' % (self.name, url, str(e).splitlines()[0] if str(e)
                         else type(e).__name__))
