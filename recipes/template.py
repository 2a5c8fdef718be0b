"""``slaposha:template``: a file rendered with buildout's own substitution.

``${section:option}`` takes the value of this buildout; ``$${`` writes a
literal ``${``, left for the buildout that reads the output (the partition's,
for an instance profile).

Options: ``template`` (a path or URL; a relative path is relative to the
profile that names it, as SlapOS's buildout does with
``${:_profile_base_location_}``, which upstream zc.buildout lacks),
``output``, and optionally ``mode`` (octal, e.g. 0755).
"""

import os
import re

__all__ = ['Recipe', 'render']

_REFERENCE = re.compile(r'\$(\$)?\{([^:}\s]*):([^}\s]+)\}')


def render(text, buildout, section):
    """``text`` with its ``${s:o}`` substituted and ``$${`` unescaped."""
    def value(m):
        if m.group(1):
            return '${%s:%s}' % (m.group(2), m.group(3))
        return buildout[m.group(2) or section][m.group(3)]
    return _REFERENCE.sub(value, text)


def _is_url(path):
    return re.match(r'^[a-z][a-z0-9+.-]*://', path) is not None


class Recipe(object):

    def __init__(self, buildout, name, options):
        self.buildout = buildout
        self.name = name
        self.options = options
        for option in ('template', 'output'):
            if not options.get(option, '').strip():
                self._fail(option, 'required option is missing')
        self.template = self._locate(options['template'].strip())

    def _fail(self, option, message):
        import zc.buildout
        raise zc.buildout.UserError('[%s] %s: %s' % (self.name, option,
                                                       message))

    def _profile_base(self):
        """The folder (or URL) of the profile that set ``template``."""
        base = self.options.get('_profile_base_location_')
        if base:
            return base
        annotated = getattr(self.buildout, '_annotated', {})
        key = annotated.get(self.name, {}).get('template')
        source = getattr(key, 'source', None)
        if isinstance(source, str):
            source = source.split(' (downloaded as ')[0]
            if os.path.isabs(source) or _is_url(source):
                return source.rsplit('/', 1)[0]
        return None

    def _locate(self, template):
        if os.path.isabs(template) or _is_url(template):
            return template
        base = self._profile_base()
        if base is None:
            self._fail('template', 'cannot tell which profile names %r:'
                       ' expected an absolute path or a URL' % template)
        return base + '/' + template

    def install(self):
        if _is_url(self.template):
            from zc.buildout.download import Download
            path, is_temp = Download(self.buildout['buildout'])(
                self.template)
        else:
            path, is_temp = self.template, False
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            self._fail('template', 'cannot read %s: %s' % (
                self.template, e.strerror or e))
        finally:
            if is_temp:
                os.remove(path)
        output = self.options['output']
        mode = self.options.get('mode', '').strip()
        try:
            mode = int(mode, 8) if mode else 0o644
        except ValueError:
            self._fail('mode', 'expected an octal mode such as 0755 (got %r)'
                       % mode)
        os.makedirs(os.path.dirname(output) or '.', exist_ok=True)
        tmp = output + '.tmp'
        with open(tmp, 'w') as f:
            f.write(render(text, self.buildout, self.name))
        os.chmod(tmp, mode)
        os.replace(tmp, output)
        return [output]

    update = install
