"""The agent's watchdog process: started again when it died, so that a
frozen agent stays covered."""

import time

from slaposha.watchdog import Watchdog


def test_a_dead_watchdog_is_started_again_at_the_next_arm():
    dog = Watchdog().start()
    try:
        first = dog.proc.pid
        dog.proc.kill()
        dog.proc.wait(5)
        assert not dog.alive()
        assert dog.arm(time.time() + 3600)
        assert dog.alive() and dog.proc.pid != first
    finally:
        dog.stop()
    assert not dog.alive()
