"""benchmark.device_median against a simulated GPU: a host that issues work and a device that runs it in order.

The simulation keeps two clocks in ms: the host's (advanced by each call's issue time, and by waiting) and the
device's (a queue: an operation starts when both it has been issued and the previous one has finished). Events
read the device clock when the device reaches them. A bounded launch queue blocks the host as CUDA's does."""

import statistics

import pytest

from cosformer.tools.benchmark import device_median


class SimGPU:
    def __init__(self, queue_limit: int = 1024):
        self.host = 0.0
        self.device_free = 0.0
        self.pending: list[float] = []  # end times of operations not yet finished (for the queue limit)
        self.queue_limit = queue_limit

    def _enqueue(self, duration: float) -> float:
        self.pending = [t for t in self.pending if t > self.host]
        if len(self.pending) >= self.queue_limit:  # a full queue: the host waits for the oldest to finish
            self.host = self.pending.pop(0)
        start = max(self.device_free, self.host)
        self.device_free = start + duration
        self.pending.append(self.device_free)
        return start

    def kernel(self, host_ms: float, device_ms: float) -> None:
        self.host += host_ms
        self._enqueue(device_ms)

    # the clock interface device_median uses
    def synchronize(self):
        self.host = max(self.host, self.device_free)

    def perf_ms(self):
        return self.host

    def sleep_ms(self, ms):
        self.host += 0.005
        self._enqueue(ms)

    def event(self):
        gpu = self

        class Event:
            def record(self):
                gpu.host += 0.002
                self.t = gpu._enqueue(0.0)

            def elapsed_time(self, other):
                return other.t - self.t

        return Event()


def host_bound_fn(gpu, host_ms, device_ms, launches=1):
    def fn():
        for _ in range(launches):
            gpu.kernel(host_ms / launches, device_ms / launches)

    return fn


@pytest.mark.parametrize("host_ms, device_ms", [(1.0, 0.1), (0.05, 0.4), (3.0, 0.02)])
def test_device_time_alone_whatever_the_host_costs(host_ms, device_ms):
    gpu = SimGPU()
    got = device_median(host_bound_fn(gpu, host_ms, device_ms), clock=gpu, samples=5)
    assert got == pytest.approx(device_ms, rel=1e-6)


def test_a_wall_clock_loop_would_have_timed_the_host():
    """The same simulation timed the naive way (events around back-to-back calls, no sleep) reads the host's time:
    the bug device_median exists to avoid, and the simulation must be able to show it."""
    gpu = SimGPU()
    fn = host_bound_fn(gpu, 1.0, 0.1)
    start, end = gpu.event(), gpu.event()
    gpu.synchronize()
    start.record()
    for _ in range(10):
        fn()
    end.record()
    gpu.synchronize()
    assert start.elapsed_time(end) / 10 > 0.9


def test_the_sleep_grows_until_it_covers_the_issue():
    gpu = SimGPU()
    slept = []
    sleep = gpu.sleep_ms
    gpu.sleep_ms = lambda ms: (slept.append(ms), sleep(ms))[1]
    # 10 calls of 5 ms host each: 50 ms of issue, more than the first 20 ms sleep
    got = device_median(host_bound_fn(gpu, 5.0, 0.3), clock=gpu, samples=3, sleep_ms=20.0)
    assert got == pytest.approx(0.3, rel=1e-6)
    assert slept[0] == 20.0 and max(slept) >= 80.0


def test_a_full_launch_queue_halves_the_calls():
    """With a queue of 16 operations, 10 calls of 4 launches block the host while the GPU sleeps; no sleep helps,
    fewer calls per sample do."""
    gpu = SimGPU(queue_limit=16)
    got = device_median(host_bound_fn(gpu, 0.4, 0.2, launches=4), clock=gpu, samples=3, max_sleep_ms=40.0)
    assert got == pytest.approx(0.2, rel=1e-6)


def test_an_unhideable_call_raises():
    gpu = SimGPU()
    with pytest.raises(RuntimeError, match="cannot be separated"):
        device_median(host_bound_fn(gpu, 50.0, 0.1), clock=gpu, samples=2, sleep_ms=5.0, max_sleep_ms=20.0)


def test_the_median_of_samples():
    """Samples whose calls take different times: the median of the per-sample means, not their mean."""
    gpu = SimGPU()
    per_sample = [0.3, 0.1, 0.9, 0.2, 0.5]
    durations = iter([0.1] + [d for d in per_sample for _ in range(10)])  # the warm-up call, then 10 per sample

    def fn():
        gpu.kernel(0.01, next(durations))

    assert device_median(fn, clock=gpu, samples=5) == pytest.approx(statistics.median(per_sample), rel=1e-6)


def test_timer_kinds():
    import torch

    from cosformer.tools.benchmark import TIMER_NAMES, make_timer, timer_name

    with pytest.raises(ValueError, match="timer kind"):
        make_timer(torch.device("cpu"), warmup_ms=1, rep_ms=1, smoke_reps=1, kind="gpu")
    assert timer_name(True, "device").endswith("(smoke)")
    assert timer_name(False, "device") == TIMER_NAMES["device"] != TIMER_NAMES["wall"]
