"""CudaGraphForward: inputs checked before any work; the order of the GPU-side handshakes between
calls (with torch.cuda's graph, stream and event objects replaced by recording fakes on the CPU);
and, on a GPU, replays from several threads on their own streams and on a second GPU."""
import contextlib
import threading

import pytest
import torch

from headsteer.runtime.cuda_graph import CudaGraphForward


def _never_called(*args, key=None):
    raise AssertionError("the forward ran")


@pytest.mark.parametrize("inputs", [(torch.zeros(2),), (), (torch.zeros(2), 3)], ids=["cpu", "none", "not-a-tensor"])
def test_inputs_that_are_not_cuda_tensors_are_refused_before_any_work(inputs):
    """A CPU tensor used to reach the capture: on a GPU machine its ops are not captured, so every
    replay returned the outputs computed at capture time; without a GPU, an error from torch.cuda."""
    with pytest.raises(ValueError, match="tensors on one CUDA device"):
        CudaGraphForward(_never_called)(*inputs)


@pytest.mark.parametrize("settings", [dict(max_graphs=0), dict(max_graphs=1.5), dict(max_graphs=True),
                                      dict(warmup=-1), dict(warmup=None)])
def test_bad_settings_are_refused_when_built(settings):
    """max_graphs=0 used to pass and fail each first call with a bare StopIteration (evicting from
    an empty cache)."""
    name = next(iter(settings))
    with pytest.raises(ValueError, match=name):
        CudaGraphForward(_never_called, **settings)


class _Recorder:
    """Stands in for torch.cuda's Stream, Event, CUDAGraph, graph, stream, device and
    current_stream, logging what each call asks the GPU to order."""

    def __init__(self):
        self.log = []
        self.current = "A"
        self.pairs = []  # (input, output) of the forward's last (capturing) call
        self.order = []  # stream handshakes, captures and forward calls (stream, key), in order

    def install(self, monkeypatch):
        recorder = self

        class Stream:
            def __init__(self, name="side"):
                self.name = name

            def wait_stream(self, other):
                recorder.order.append(("wait_stream", self.name, other.name))

            def wait_event(self, event):
                recorder.log.append(("wait", self.name, event))

        class Event:
            def record(self, stream):
                recorder.log.append(("record", stream.name, self))

        class Graph:
            def replay(self):
                recorder.log.append(("replay", recorder.current))
                static_in, static_out = self.pair
                static_out.copy_(static_in * 2)

        @contextlib.contextmanager
        def graph(g, capture_error_mode="global"):
            recorder.log.append(("capture", capture_error_mode))
            recorder.order.append(("capture",))
            yield
            g.pair = recorder.pairs[-1]  # (the forward call this graph captured)

        @contextlib.contextmanager
        def device(d):
            recorder.log.append(("device", str(d)))
            yield

        @contextlib.contextmanager
        def stream(s):
            before, recorder.current = recorder.current, s.name
            yield
            recorder.current = before

        for name, value in dict(Stream=Stream, Event=Event, CUDAGraph=Graph, graph=graph, device=device, stream=stream,
                                current_stream=lambda: Stream(recorder.current)).items():
            monkeypatch.setattr(torch.cuda, name, value, raising=False)
        monkeypatch.setattr(CudaGraphForward, "_device", staticmethod(lambda inputs: torch.device("cuda", 0)), raising=False)

    def forward(self, x, key=None):
        self.order.append(("forward", self.current, key))
        out = x * 2
        self.pairs.append((x, out))
        return (out,)


def test_replays_wait_for_the_previous_call_and_return_their_own_tensors(monkeypatch):
    recorder = _Recorder()
    recorder.install(monkeypatch)
    graphed = CudaGraphForward(recorder.forward, warmup=0)
    first = graphed(torch.tensor([1.0, 2.0]))[0]
    recorder.current = "B"  # a second caller on another stream (e.g. another thread's)
    second = graphed(torch.tensor([5.0, 7.0]))[0]
    assert first.tolist() == [2.0, 4.0] and second.tolist() == [10.0, 14.0]  # the first result kept
    log = [entry for entry in recorder.log if entry[0] != "device"]
    assert log[0] == ("capture", "thread_local")  # other threads' CUDA work may go on meanwhile
    event = log[3][2]
    assert log[1:] == [("wait", "A", event), ("replay", "A"), ("record", "A", event),
                       ("wait", "B", event), ("replay", "B"), ("record", "B", event)]
    assert [entry for entry in recorder.log if entry[0] == "device"] == [("device", "cuda:0")] * 2


def test_the_least_recently_used_graph_goes_first(monkeypatch):
    """At max_graphs, a new signature evicts the graph used longest ago, not the one captured
    first: an Engine's batch-1 graph from load stays while batch 1 is still being served."""
    recorder = _Recorder()
    recorder.install(monkeypatch)
    graphed = CudaGraphForward(recorder.forward, warmup=0, max_graphs=2)

    def captures():
        return sum(entry[0] == "capture" for entry in recorder.log)

    graphed(torch.ones(1))
    graphed(torch.ones(2))
    assert graphed(torch.tensor([3.0]))[0].tolist() == [6.0]  # batch 1 again: a replay
    graphed(torch.ones(3))  # evicts batch 2, used longest ago
    assert captures() == 3
    assert graphed(torch.tensor([4.0]))[0].tolist() == [8.0] and captures() == 3
    graphed(torch.ones(2))
    assert captures() == 4


def test_capture_warms_up_on_a_side_stream_then_captures_with_the_key(monkeypatch):
    """By default two warm-up calls run first, on a side stream ordered after the caller's work and
    before the capture; every call of the forward gets the key; a replay calls it no more."""
    recorder = _Recorder()
    recorder.install(monkeypatch)
    graphed = CudaGraphForward(recorder.forward)
    graphed(torch.ones(2), key="budget")
    graphed(torch.ones(2), key="budget")
    assert recorder.order == [("wait_stream", "side", "A"), ("forward", "side", "budget"),
                              ("forward", "side", "budget"), ("wait_stream", "A", "side"), ("capture",),
                              ("forward", "A", "budget")]


def test_the_key_and_the_dtype_are_part_of_the_signature(monkeypatch):
    recorder = _Recorder()
    recorder.install(monkeypatch)
    graphed = CudaGraphForward(recorder.forward, warmup=0)

    def captures():
        return sum(entry[0] == "capture" for entry in recorder.log)

    graphed(torch.ones(2), key=0.5)
    graphed(torch.ones(2), key=0.25)
    assert captures() == 2
    out = graphed(torch.tensor([1.0, 3.0], dtype=torch.float64), key=0.5)[0]
    assert captures() == 3 and out.dtype == torch.float64 and out.tolist() == [2.0, 6.0]
    graphed(torch.ones(2), key=0.5)
    assert captures() == 3


def test_a_later_call_never_writes_into_a_callers_input(monkeypatch):
    """The graph's inputs are its own copies: a replay's inputs are copied there, not into the
    tensor the capturing call was given."""
    recorder = _Recorder()
    recorder.install(monkeypatch)
    graphed = CudaGraphForward(recorder.forward, warmup=0)
    first = torch.tensor([1.0, 2.0])
    graphed(first)
    graphed(torch.tensor([5.0, 7.0]))
    assert first.tolist() == [1.0, 2.0]


def test_a_second_thread_waits_for_a_capture_in_progress(monkeypatch):
    """Two threads with one new signature: the second waits on the lock and replays the first's
    graph, never running the forward alongside it (a second capture of one signature)."""
    recorder = _Recorder()
    recorder.install(monkeypatch)
    entered, overlap = threading.Event(), threading.Event()
    active = []

    def forward(x, key=None):
        active.append(x)
        if len(active) > 1:
            overlap.set()
        entered.set()
        overlap.wait(0.2)  # (long enough for the second thread to reach the forward if it could)
        active.remove(x)
        return recorder.forward(x, key=key)

    graphed = CudaGraphForward(forward, warmup=0)
    threads = [threading.Thread(target=graphed, args=(torch.ones(2),)) for _ in range(2)]
    threads[0].start()
    entered.wait(5)
    threads[1].start()
    for thread in threads:
        thread.join(5)
    assert not overlap.is_set()
    assert sum(entry[0] == "capture" for entry in recorder.log) == 1


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _heavy(weight):
    def forward(x, key=None):  # long enough on the GPU for replays on two streams to overlap
        for _ in range(20):
            x = torch.tanh(x @ weight)
        return (x,)

    return forward


@needs_cuda
def test_threads_on_their_own_streams_get_their_own_results():
    weight = torch.randn(1024, 1024, device="cuda") / 32
    forward = _heavy(weight)
    graphed = CudaGraphForward(forward)
    inputs = [torch.randn(512, 1024, device="cuda") for _ in range(4)]
    expected = [forward(x)[0] for x in inputs]
    graphed(inputs[0])  # captured before the threads start
    errors = []

    def serve(index):
        with torch.cuda.stream(torch.cuda.Stream()):
            for _ in range(20):
                got = graphed(inputs[index])[0]
                torch.cuda.current_stream().synchronize()
                if not torch.allclose(got, expected[index], atol=1e-4, rtol=1e-4):
                    errors.append(index)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


@needs_cuda
def test_capture_while_another_thread_copies_to_the_gpu():
    weight = torch.randn(256, 256, device="cuda") / 16
    graphed = CudaGraphForward(_heavy(weight))
    stop, errors = threading.Event(), []

    def copy_requests():  # another request's host<->device traffic during the capture
        try:
            while not stop.is_set():
                torch.randn(64, 256).to("cuda").cpu()
        except RuntimeError as error:
            errors.append(error)

    thread = threading.Thread(target=copy_requests)
    thread.start()
    try:
        for batch in (3, 5, 7):
            x = torch.randn(batch, 256, device="cuda")
            torch.testing.assert_close(graphed(x)[0], _heavy(weight)(x)[0])
    finally:
        stop.set()
        thread.join()
    assert not errors


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_replay_on_a_device_other_than_the_current_one():
    weight = torch.randn(64, 64, device="cuda:1")
    graphed = CudaGraphForward(_heavy(weight))
    for _ in range(3):  # new inputs each time: a graph without the launches would repeat the first result
        x = torch.randn(8, 64, device="cuda:1")
        torch.testing.assert_close(graphed(x)[0], _heavy(weight)(x)[0])

