"""Test shim (on PYTHONPATH only in tests that ask for it): a run that holds at step k until its stop signal
arrives, and a checkpoint taken after a stop signal that starts
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

if os.environ.get("CITYSEG_TEST_HOLD_AT_STEP"):
    # Event-driven, not speed-sized: the main process waits after step k until a stop signal has arrived (at most
    # 45 s, below the tests' 1-minute collective timeout), so a fast machine cannot finish the run first.
    import signal
    import time

    from cityseg.distributed import markers

    _real_mark_step = markers.mark_step

    def _holding_mark_step(step: int) -> None:
        _real_mark_step(step)
        if step == int(os.environ["CITYSEG_TEST_HOLD_AT_STEP"]):
            flag = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
            deadline = time.monotonic() + 45
            while flag is not None and not flag.received and time.monotonic() < deadline:
                time.sleep(0.1)

    markers.mark_step = _holding_mark_step
