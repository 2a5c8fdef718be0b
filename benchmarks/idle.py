"""What a cluster at rest costs: CPU and memory of each process (issue 21).

Two set-ups in the lab, real etcd members and agents, TLS:

- ``small``: two hosts and a witness, one service (the issue's first
  measurement: the owner's agent used 4.4 % of a core, its member 6.4 %);
- ``large``: five hosts, each with its etcd member, and 30 services spread
  over them (each host the preferred one of six).

Once every service runs and the cluster has settled, the CPU time of every
process of every host is read from /proc at the start and the end of the
measured span (nothing runs in the hosts but the agents, their watchdogs,
their members and the services' sleeping programs); RSS is the largest
seen in samples every 5 s. Each host is shown with its role: the owner of
the most services, a standby (owns none), or witness.

    .venv/bin/python benchmarks/idle.py [--setup small|large|both]
        [--seconds 60] [--settle 10] [--etcd /usr/bin/etcd]

Goals: agent under 1 % of a core, its etcd member under 3 %, agent RSS
under 60 MB.
"""

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from slaposha.lab import Lab, wait_for  # noqa: E402
from slaposha.lab.cluster import LabCluster, spread_services  # noqa: E402

GOALS = {'agent': (1.0, 60.0), 'etcd': (3.0, None)}
TICK = os.sysconf('SC_CLK_TCK')
PAGE = os.sysconf('SC_PAGE_SIZE')


def setups(marker):
    """{name: (hosts, witnesses, services)}."""
    five = ['hA', 'hB', 'hC', 'hD', 'hE']
    return {
        'small': (['hA', 'hB'], ['hW'], {'web': '''
            [service]
            hosts = hA hB
            [app#main]
            command = exec sleep %d
        ''' % marker}),
        'large': (five, [], spread_services(five, 30, marker)),
    }


def kind(pid):
    """What a process of a host is: agent, witness, watchdog, etcd or
    service (None for the lab's own short-lived helpers)."""
    try:
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            argv = [a.decode('utf-8', 'replace')
                    for a in f.read().split(b'\0') if a]
    except OSError:
        return None
    if not argv:
        return None
    text = ' '.join(argv)
    if os.path.basename(argv[0]).startswith('etcd'):
        return 'etcd'
    if 'slaposha.watchdog' in text:
        return 'watchdog'
    if 'slaposha.cli.main' in text or 'bin/slaposha' in text:
        for verb in ('agent', 'witness'):
            if verb in argv:
                return verb
    if argv[0] in ('sh', 'nsenter'):
        return None  # the lab's wrappers, replaced by exec
    return 'service'


def cpu_ticks(pid):
    try:
        with open('/proc/%d/stat' % pid) as f:
            fields = f.read().rsplit(')', 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return None


def rss_mb(pid):
    try:
        with open('/proc/%d/statm' % pid) as f:
            return int(f.read().split()[1]) * PAGE / 1e6
    except (OSError, IndexError, ValueError):
        return None


def owners(lc, via):
    """{service: owner host} as etcd says, and the hosts announced alive."""
    return lc.query(via, '''
        result = {}
        for kv in client.get_prefix(keys.services):
            name, _, field = kv.key[len(keys.services):].partition('/')
            if field == 'state':
                state = json.loads(kv.value)
                result[name] = state.get('host') if state.get('state') == \
                    'running' else None
    ''')


def measure(lab, lc, services, seconds, settle):
    via = lc.hosts[0]

    def settled():
        where = owners(lc, via)
        return len([s for s in services if where.get(s)]) == len(services) \
            and where
    where = wait_for(settled, 120, interval=1.0,
                     what='every service running')
    time.sleep(settle)
    where = owners(lc, via)
    count = {h: 0 for h in lc.hosts}
    for host in where.values():
        count[host] = count.get(host, 0) + 1
    processes = {}  # pid: (host, kind)
    for host in lab:
        for pid in host.pids():
            what = kind(pid)
            if what is not None:
                processes[pid] = (host.name, what)
    first = {pid: cpu_ticks(pid) for pid in processes}
    rss = {pid: rss_mb(pid) or 0.0 for pid in processes}
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        time.sleep(min(5.0, seconds - (time.monotonic() - began)))
        for pid in processes:
            rss[pid] = max(rss[pid], rss_mb(pid) or 0.0)
    span = time.monotonic() - began
    last = {pid: cpu_ticks(pid) for pid in processes}
    rows = []
    for pid, (host, what) in processes.items():
        if first[pid] is None or last[pid] is None:
            continue  # ended during the span: it has no share to show
        cpu = 100.0 * (last[pid] - first[pid]) / TICK / span
        rows.append((host, what, pid, cpu, rss[pid]))
    return rows, count, where


def role(host, count, witnesses):
    if host in witnesses:
        return 'witness'
    most = max(count.values())
    if count.get(host) == most and most:
        return 'owner of %d' % most
    if not count.get(host):
        return 'standby'
    return 'owner of %d' % count[host]


def report(name, rows, count, witnesses, seconds):
    print('\n== %s: %d host(s) + %d witness(es), %d service(s), %.0f s at'
          ' rest' % (name, len(count), len(witnesses), sum(count.values()),
                     seconds))
    print('%-4s %-12s %-9s %8s %9s' % ('host', 'role', 'process',
                                       'cpu %', 'rss MB'))
    order = {'agent': 0, 'witness': 0, 'etcd': 1, 'watchdog': 2,
             'service': 3}
    services = {}
    for host, what, pid, cpu, rss in sorted(
            rows, key=lambda r: (r[0], order[r[1]], r[2])):
        if what == 'service':
            total = services.setdefault(host, [0, 0.0, 0.0])
            total[0] += 1
            total[1] += cpu
            total[2] += rss
            continue
        print('%-4s %-12s %-9s %8.2f %9.1f' % (
            host, role(host, count, witnesses), what, cpu, rss))
    for host, (n, cpu, rss) in sorted(services.items()):
        print('%-4s %-12s %-9s %8.2f %9.1f   (%d programs)' % (
            host, role(host, count, witnesses), 'services', cpu, rss, n))
    summary = {}
    for what in ('agent', 'etcd'):
        cpus = [r[3] for r in rows if r[1] == what]
        rsss = [r[4] for r in rows if r[1] == what]
        if cpus:
            summary[what] = (max(cpus), max(rsss))
    for what, (cpu, rss) in summary.items():
        cpu_goal, rss_goal = GOALS[what]
        print('%s: highest %.2f %% of a core (goal < %g %%), highest RSS'
              ' %.1f MB%s' % (what, cpu, cpu_goal, rss,
                              ' (goal < %g MB)' % rss_goal if rss_goal
                              else ''))
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--setup', choices=['small', 'large', 'both'],
                        default='both')
    parser.add_argument('--seconds', type=float, default=60.0)
    parser.add_argument('--settle', type=float, default=10.0,
                        help='seconds at rest before the measured span')
    parser.add_argument('--etcd', help='etcd executable of the members'
                        ' (default: the lab\'s)')
    parser.add_argument('--json', help='also write the rows to this file')
    args = parser.parse_args()
    names = ['small', 'large'] if args.setup == 'both' else [args.setup]
    results = {}
    for name in names:
        hosts, witnesses, _ = setups(0)[name]
        with Lab(hosts + witnesses) as lab:
            marker = 86400 + 100 * int(lab.id, 16)
            services = setups(marker)[name][2]
            options = {'etcd_binary': args.etcd} if args.etcd else {}
            lc = LabCluster(lab, hosts, witnesses, services=services,
                            tls=True, **options)
            version = lab[hosts[0]].run(
                [etcd_binary(lc), '--version']).stdout.split('\n')[0]
            lc.start()
            try:
                rows, count, _ = measure(lab, lc, services, args.seconds,
                                         args.settle)
            finally:
                for host in hosts:
                    lc.stop_agent(host)
        results[name] = rows
        report(name, rows, count, witnesses, args.seconds)
    print('\nmachine: %s, %d cores, Python %s, %s' % (
        platform.platform(), os.cpu_count(), platform.python_version(),
        version))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)


def etcd_binary(lc):
    """The etcd the lab's members run (the lab's own, or etcd in PATH)."""
    return getattr(lc, 'etcd_binary', None) or 'etcd'


if __name__ == '__main__':
    main()
