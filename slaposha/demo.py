"""The demo: what slaposha does, on a lab of two hosts and a witness.

Until the agent lands this shows the stage the demo will play on: the lab's
hosts, each with its own SlapOS paths, reachable from each other, then cut
off and healed, then torn down.
"""

import sys
import time

from slaposha.lab import Lab, LabError


def say(text):
    print('[%6.2fs] %s' % (time.monotonic() - _T0, text))
    sys.stdout.flush()


_T0 = time.monotonic()


def main():
    try:
        with Lab(['hA', 'hB', 'hW']) as lab:
            say('lab %s: hosts on a private bridge, no route out' % lab.id)
            for host in lab:
                hostname = host.run(['hostname']).stdout.strip()
                host.run(['sh', '-c', 'echo %s > /etc/opt/slapos/owner'
                          % host.name])
                owner = host.run(['cat', '/etc/opt/slapos/owner']
                                 ).stdout.strip()
                say('  %-3s %-11s %-14s hostname %s, /etc/opt/slapos is'
                    ' its own (%s)' % (host.name, host.address,
                                       host.address6, hostname, owner))
            a, b = lab['hA'], lab['hB']
            say('hA reaches hB: %s' % a.ping(b))
            lab.partition(['hA'])
            say('partition hA away: hA reaches hB: %s' % a.ping(b))
            lab.heal()
            say('heal: hA reaches hB: %s' % a.ping(b))
            b.spawn(['sleep', '600'], name='sleeper')
            lab.crash('hB')
            say('crash hB: processes left on hB: %d' % len(b.pids()))
            say('tearing the lab down')
        say('done')
    except LabError as e:
        print('demo: %s' % e, file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
