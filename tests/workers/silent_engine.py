"""A stand-in engine process for tests of the pool's side: it says where it is stuck, then never answers."""

import faulthandler
import signal
import time


def serve(conn, model, kwargs, env, phase):
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    phase.value = b"stuck in a test"
    time.sleep(120)
