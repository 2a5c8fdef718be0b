"""``slaposha slapos release``: an adopted node given back to SlapOS.

On the host that ran it last, the service stopped (``slaposha stop``):

- the service is frozen in the cluster (no agent starts it again) and its
  file set aside here (``<name>.cfg.released``: agents started afterwards
  do not load it);
- the cron entries that adopt disabled come back, or are written back from
  what adopt kept in the identity when the node moved to this host since;
- the host's own ``re6stnet.service``, which adopt stopped and disabled,
  is enabled (and started) again here;
- slapos.cfg's ``input_definition_file`` is as it was, on the host where
  the node was adopted (elsewhere the pinned definition stays: without it
  format would choose other addresses there);
- the node is started as SlapOS starts it, without buildout: `slapos node
  format` (its addresses), then `slapos node start all` (the instance
  supervisord and the programs of the started partitions).

No data moves. Run again, it finds what is done already.
"""

import os
import subprocess
import time

from slaposha.slapos import cron
from slaposha.slapos.adopt import (
    STATE, AdoptError, data_state, kept_entries, read_state, slapos_command,
    supervisord_pid, write_state)
from slaposha.slapos.files import set_key, write_atomic
from slaposha.slapos.node import NodeError, load_node
from slaposha.slapos.systemd import OFF, RE6ST_UNIT, UnitError, Units

__all__ = ['release']

# Seconds each SlapOS command that starts the node is given by default
# (format may wait for the master): `slaposha slapos release --timeout`.
START_TIMEOUT = 600


def release(cfg, cluster, host, agent=None, apply=False, start=True,
            cron_dir=cron.CRON_DIR, crontab=cron.CRONTAB,
            timeout=START_TIMEOUT, units=None):
    """Give the adopted node back to SlapOS on this host. ``agent(method,
    route, body)`` asks this host's agent (None: no agent answers). Returns
    lines: the plan, or what was done with ``apply``."""
    try:
        node = load_node(cfg)
    except NodeError as e:
        raise AdoptError(str(e))
    folder = os.path.dirname(node.config_path)
    state = read_state(folder)
    if state is None:
        raise AdoptError('%s: no %s: this node was not adopted (or its'
                         ' identity is not on this host)' % (folder, STATE))
    name = state['service']
    if not os.path.isdir(node.instance_root) or \
            data_state(node.instance_root)[0] != 'subvolume':
        raise AdoptError('%s is not here: release the node on the host that'
                         ' ran it last' % node.instance_root)
    notes = []
    if agent is not None:
        status = agent('GET', '/status', None)
        svc = (status.get('services') or {}).get(name)
        if svc is None and status.get('services') is not None:
            notes.append('the agents do not know %s' % name)
        elif svc is not None and svc.get('owner'):
            raise AdoptError('%s runs on %s: stop it first (`slaposha stop %s`:'
                             ' its programs stop and a last snapshot goes to'
                             ' the standbys), then release it on %s' % (
                                 name, svc['owner'], name, svc['owner']))
        history = agent('GET', '/history', None).get('history') or []
        moves = [h for h in history if h.get('service') == name]
        last = moves[-1]['to'] if moves else state.get('host')
        if last != host:
            raise AdoptError('%s ran on %s last, not here: release it there'
                             ' (its data is the newest there)' % (name, last))
    else:
        notes.append('no agent answers here: make sure no agent runs %s any'
                     ' more (its service file is set aside here; remove it'
                     ' on the other hosts too)' % name)
    service_file = os.path.join(cluster.services_dir, name + '.cfg')
    entries = cron.entries(cron_dir, crontab)
    disabled = [e for e in entries if e.disabled]
    missing = [p for p in sorted(state.get('cron', {}))
               if not any(e.path == p for e in entries)]
    slapos = slapos_command(entries or kept_entries(state))
    restore_cfg = state.get('host') == host
    unit = unit_back(state, units or Units())
    plan = ['release %s (service %s) on %s: a plain SlapOS node again, no'
            ' data moved' % (node.computer_id, name, host)]
    plan += ['  - ' + n for n in notes]
    steps = [
        ('frozen in the cluster: no agent starts %s again' % name,
         agent is not None),
        ('%s set aside as %s.released' % (service_file, service_file),
         os.path.exists(service_file)),
        ('cron: %d entr%s back' % (len(disabled), 'y' if len(disabled) == 1
                                   else 'ies'), bool(disabled)),
        ('cron: %s written back as it was at adopt' % ', '.join(missing),
         bool(missing)),
        ('%s [slapformat] input_definition_file back to %s' % (
            node.config_path, state.get('input_definition_file') or
            '(none)') if restore_cfg else 'the pinned definition file is'
         ' kept: it holds the addresses the node has (adopted on %s)'
         % state.get('host'), restore_cfg),
        ('%s enabled%s again, as it was before adopt (the node\'s re6st'
         ' daemon from this host)' % (RE6ST_UNIT, ' and started' if start
                                     else ''), unit is not None),
        ('the node started as SlapOS starts it, no buildout: `%s node format'
         ' --now`, then `node start all`' % slapos, start),
    ]
    if not apply:
        return plan + ['  [%s] %s' % ('    ' if todo else 'skip', text)
                       for text, todo in steps]
    done = []
    if agent is not None:
        agent('POST', '/services/%s/freeze' % name,
              {'by': 'slaposha slapos release on %s' % host})
        done.append('%s frozen: no agent starts it again' % name)
    if os.path.exists(service_file):
        os.rename(service_file, service_file + '.released')
        done.append('%s set aside as %s.released' % (service_file,
                                                      service_file))
    if disabled:
        cron.enable(disabled)
        done.append('cron: %d entr%s back' % (
            len(disabled), 'y' if len(disabled) == 1 else 'ies'))
    for path in missing:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, state['cron'][path])
        done.append('cron: %s written back' % path)
    if restore_cfg:
        set_key(node.config_path, 'slapformat', 'input_definition_file',
                state.get('input_definition_file'))
        done.append('%s: input_definition_file as it was' % node.config_path)
    if unit is not None:
        try:
            unit.enable(RE6ST_UNIT, now=start)
        except UnitError as e:
            raise AdoptError(str(e))
        done.append('%s enabled%s' % (RE6ST_UNIT, ' and started' if start
                                       else ''))
    state['released'] = {'host': host,
                         'at': time.strftime('%Y-%m-%d %H:%M:%S')}
    write_state(folder, state)
    if start:
        done += _start_node(node, slapos, timeout)
    return done


def unit_back(state, units):
    """``units`` when this host's re6stnet.service must be enabled
    again (adopt disabled it; it was not off before), else None."""
    if state.get('re6st_unit') in (None,) + OFF:
        return None
    try:
        unit = units.state(RE6ST_UNIT)
    except UnitError as e:
        raise AdoptError(str(e))
    if unit is None or (unit[0] not in OFF and unit[1] == 'active'):
        return None
    return units


def _start_node(node, slapos, timeout):
    """As SlapOS brings a node up, without buildout: its addresses (format,
    with the pinned definition), its instance supervisord, the programs of
    the started partitions."""
    if supervisord_pid(node):
        return ['the node runs already (its instance supervisord answers)']
    env = {'PATH': '/usr/sbin:/usr/bin:/sbin:/bin', 'HOME': '/root',
           'LANG': 'C.UTF-8', 'SLAPOS_CONFIGURATION': node.config_path}
    done = []
    # `node start` launches the instance supervisord first, as slapgrid.
    for args in (['node', 'format', '--now', '--cfg', node.config_path],
                 ['node', 'start', '--cfg', node.config_path, 'all']):
        try:
            p = subprocess.run([slapos] + args, env=env,
                               stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT,
                               universal_newlines=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AdoptError('`%s %s` did not end within %g s (--timeout)' % (
                slapos, ' '.join(args), timeout))
        # format exits 0, or with OFFLINE_SUCCESS when the master is away.
        if p.returncode and not (args[1] == 'format' and p.returncode == 2):
            raise AdoptError('`%s %s` failed (exit %d): %s' % (
                slapos, ' '.join(args), p.returncode,
                (p.stdout.strip().splitlines() or [''])[-1]))
        done.append('`slapos %s`: done' % ' '.join(args[:2]))
    return done
