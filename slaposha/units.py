"""Quantities as people read them in status lines and logs."""

__all__ = ['human_seconds', 'human_bytes', 'human_age']


def human_seconds(value):
    """0.25 -> '0.2 s' (a tenth below 10 s), 42.4 -> '42 s'."""
    return '%.1f s' % value if value < 10 else '%d s' % round(value)


def human_bytes(n):
    """Decimal units: 1500 -> '1.5 KB'."""
    for unit in ('B', 'KB', 'MB', 'GB'):
        if abs(n) < 1000 or unit == 'GB':
            return ('%d %s' if unit == 'B' else '%.1f %s') % (n, unit)
        n /= 1000.0


def human_age(value):
    """How long ago, coarse: 42 -> '42s', 600 -> '10m', 10800 -> '3h',
    93600 -> '26h', 259200 -> '3d'."""
    for unit, size, below in (('s', 1, 120), ('m', 60, 7200),
                              ('h', 3600, 172800)):
        if value < below:
            return '%d%s' % (value // size, unit)
    return '%dd' % (value // 86400)
