"""``slaposha:slap-configuration``: the partition's instance parameters and
software type, from the SlapOS master, as buildout options.

slapos.cookbook's slapconfiguration needs SlapOS's own buildout (it stores
non-string values, which upstream zc.buildout refuses:
reference/slapos-internals.md 8); this one gives only strings, and needs
only the slap library of slapos.core.

Options in:

``url``, ``computer``, ``partition``, ``key``, ``cert``
    how to reach the master: ``[slap-connection]``'s server-url,
    computer-id, partition-id, key-file and cert-file.
``parameters``, ``software-type``
    a JSON object of parameters (and the software type, default
    ``default``) to use instead of asking the master: a partition deployed
    without a master, or a test.
``configuration.<key>``
    the default of parameter ``<key>``.
``parts-<software type>``
    the parts each software type deploys; the recipe sets ``parts`` to the
    requested one, so that ``[buildout] parts = ${<this section>:parts}``.

Options out: ``configuration.<key>`` for every parameter (values that are not
strings as JSON), ``software-type``, ``instance-title``, ``computer-id``,
``partition-id``, ``ipv4`` and ``ipv6`` (the partition's first addresses),
``parts``.
"""

import json

__all__ = ['Recipe']


class Recipe(object):

    def __init__(self, buildout, name, options):
        self.name = name
        self.options = options
        defaults = {k[len('configuration.'):]: v for k, v in options.items()
                    if k.startswith('configuration.')}
        inline = options.get('parameters', '').strip()
        if inline:
            parameters, software_type, info = self._inline(inline)
        else:
            parameters, software_type, info = self._fetch()
        defaults.update(parameters)
        for key, value in defaults.items():
            if not isinstance(value, str):
                value = json.dumps(value, sort_keys=True)
            options['configuration.' + key] = value
        options['software-type'] = software_type
        for key, value in info.items():
            options[key] = value
        parts = 'parts-' + software_type
        known = sorted(k[len('parts-'):] for k in options.keys()
                       if k.startswith('parts-'))
        if known:
            if parts not in options:
                self._fail('software-type', 'unknown software type %r'
                           ' (expected one of %s)' % (software_type,
                                                      ', '.join(known)))
            options['parts'] = options[parts]

    def _fail(self, option, message):
        import zc.buildout
        raise zc.buildout.UserError('[%s] %s: %s' % (self.name, option,
                                                       message))

    def _inline(self, text):
        try:
            parameters = json.loads(text)
        except ValueError as e:
            self._fail('parameters', 'expected a JSON object: %s' % e)
        if not isinstance(parameters, dict):
            self._fail('parameters', 'expected a JSON object (got %s)'
                       % type(parameters).__name__)
        software_type = self.options.get('software-type', '').strip() or \
            'default'
        return parameters, software_type, {
            'instance-title': '', 'computer-id': '', 'partition-id': '',
            'ipv4': '', 'ipv6': ''}

    def _fetch(self):
        opts = self.options
        for option in ('url', 'computer', 'partition'):
            if not opts.get(option, '').strip():
                self._fail(option, 'required to ask the master for the'
                           ' parameters (from [slap-connection]), or give'
                           ' them inline with parameters')
        try:
            from slapos import slap
        except ImportError as e:
            self._fail('url', 'cannot ask the master: the slap library of'
                       ' slapos.core is missing (%s)' % e)
        from slaposha.slapos.parameters import user_parameters
        url = opts['url'].strip()
        partition = opts['partition'].strip()
        try:
            connection = slap.slap()
            connection.initializeConnection(
                url, key_file=opts.get('key') or None,
                cert_file=opts.get('cert') or None)
            cp = connection.registerComputerPartition(
                opts['computer'].strip(), partition)
            raw = dict(cp.getInstanceParameterDict() or {})
        except Exception as e:  # requests, slap and marshalling errors alike
            self._fail('url', 'cannot read the parameters of %s from %s: %s'
                       % (partition, url, str(e).splitlines()[0]
                          if str(e) else type(e).__name__))
        parameters = user_parameters(raw)
        addresses = [a[-1] for a in raw.get('ip_list') or []]
        return parameters, raw.get('slap_software_type') or 'default', {
            'instance-title': raw.get('instance_title') or '',
            'computer-id': opts['computer'].strip(),
            'partition-id': partition,
            'ipv4': next((a for a in addresses if ':' not in a), ''),
            'ipv6': next((a for a in addresses if ':' in a), '')}

    def install(self):
        return []

    update = install
