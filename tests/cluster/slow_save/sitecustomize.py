"""Test shim (on PYTHONPATH only in tests that ask for it): a checkpoint taken after a stop signal starts
CITYSEG_TEST_SLOW_STOP_SAVE_S seconds late, as a large model on a slow shared filesystem takes that long."""
import os

if os.environ.get("CITYSEG_TEST_SLOW_STOP_SAVE_S"):
    import signal
    import time

    from cityseg import checkpoint

    _real_save = checkpoint.save

    def _slow_save(*args, **kwargs):
        flag = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)  # the run's StopFlag
        if flag is not None and flag.received:
            print(f"slow_save: stop signal {flag.received}: the checkpoint starts in "
                  f"{os.environ['CITYSEG_TEST_SLOW_STOP_SAVE_S']} s", flush=True)
            time.sleep(float(os.environ["CITYSEG_TEST_SLOW_STOP_SAVE_S"]))
        return _real_save(*args, **kwargs)

    checkpoint.save = _slow_save
