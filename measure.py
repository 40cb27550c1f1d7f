"""measure: how bench.py measures a step -- its time, the device's busy time inside it, the
memory it peaks at or keeps for its backward, and the bytes its compiled kernels move. Each
takes the step as a function, so a run alone and a pack are measured alike; none knows lamo.
"""
from __future__ import annotations

import collections
import gc
import logging
import math
import time
import warnings

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gb(device) -> float | None:
    """Peak GPU memory since the last call (then reset), in GiB; None off CUDA."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def timed(fn, n, device, warmup=1):
    """Seconds per fn() over n calls after warmup. A training step's statistics (a tensor) must
    be finite at the end: the speed of a step gone NaN says nothing."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    sync(device)
    seconds = (time.perf_counter() - t0) / n
    if isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
        raise RuntimeError(f"the timed step's losses are not finite ({out.tolist()})")
    return seconds


def device_busy(step, device, n=3, top=8) -> dict:
    """Where a step's time goes, from torch.profiler over n more steps: "ms", the milliseconds a
    step keeps the device busy (CUDA: running kernels, the union of their intervals; CPU: inside
    operators), and "top", the `top` kernels (CPU: operators, by self time) as [name, ms a step].
    Beside a step's wall time (1 / its rate) it says what bounds the step: busy near wall, the
    device's work (only less work, or faster kernels, speeds it up); busy far below wall, the
    host's launching (what CUDA graphs, --compile and packs fill). Kernel durations do not
    depend on the profiler's overhead on the host, so the busy time is the real one."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    # On CUDA the kernels alone: the host's operators would be tens of thousands of events a
    # pack's step for the profiler to parse, and say nothing of the device's time. Some torch
    # builds record no kernels without CPU activity too: then once more with it.
    for activities in ([[ProfilerActivity.CUDA], [ProfilerActivity.CPU, ProfilerActivity.CUDA]]
                       if cuda else [[ProfilerActivity.CPU]]):
        with profile(activities=activities) as prof:
            for _ in range(n):
                step()
            sync(device)
        # record_function's ranges (the optimizer's step) span their gaps too: not busy time
        events = [e for e in prof.events() if e.device_type == kind
                  and not getattr(e, "is_user_annotation", False)]
        if events:
            break
    else:
        raise RuntimeError(f"the profiler saw no {device.type} activity in {n} steps")
    busy, end = 0.0, -math.inf                       # the union of the events' intervals, in us
    for start, stop in sorted((e.time_range.start, e.time_range.end) for e in events):
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    own = collections.Counter()
    for e in events:
        own[e.name] += e.time_range.elapsed_us() if cuda else e.self_cpu_time_total
    return {"ms": busy / 1e3 / n,
            "top": [[name, us / 1e3 / n] for name, us in own.most_common(top)]}


def saved_gib(fn, params=()) -> float:
    """GiB that autograd keeps for the backward of fn()'s graph, tensor by tensor
    (saved_tensors_hooks): each storage once, the storages of `params` (held anyway) not."""
    held = {p.untyped_storage().data_ptr() for p in params}
    kept = {}

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            kept[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        fn()
    return sum(kept.values()) / 2**30


def run_steps_per_s(step, runs: int, steps, device, warmup, busy: dict | None) -> float:
    """runs x step()'s rate over `steps` timed calls; with a dict `busy`, device_busy's figures
    (or its error) into it, after the timing."""
    rate = runs / timed(step, steps, device, warmup=warmup)
    if busy is not None:
        busy.update(busy_or_error(step, device))
    return rate


def busy_or_error(step, device) -> dict:
    """device_busy, or {"error": its first line}: the profiler failing (say, on CUDA graphs) must
    not cost the rate measured before it."""
    try:
        return device_busy(step, device)
    except Exception as e:                       # noqa: BLE001 -- any failure is the row's
        return {"error": first_line(e)}


def first_line(e: Exception) -> str:
    """An error as a row: its type and the first line of its message (200 characters at most)."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def measured(fn, device) -> tuple:
    """fn()'s result and the peak GPU memory it took (None off CUDA); its memory freed after."""
    free(device)
    peak_gb(device)
    result = fn()
    peak = peak_gb(device)
    free(device)
    return result, peak


def free(device):
    """Free what earlier measurements left: a pack lives in reference cycles (its compiled or
    bound forward holds it), which only the cyclic garbage collector frees, and on an H100 the
    packs of one bench.py left unfreed filled its 80 GB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def traffic_gib(step) -> tuple[float, float]:
    """GiB that the kernels of step()'s compiled graphs read and write, forward and backward,
    each buffer once per kernel: inductor's own count (graph.count_bytes, which it runs when its
    "inductor_metrics" log is on) as it compiles them. A step whose kernels do fewer FLOP a byte
    than the card's ratio (an H100 SXM: 989 TFLOP/s of dense bf16 over 3.35 TB/s, 295) waits on
    memory, and traffic / bandwidth is a floor for its time. Counted at compilation, so step()
    must compile (dynamo's and inductor's caches are bypassed here, and dynamo is reset: every
    function compiled before in this process compiles again); what runs eagerly (an optimizer,
    say) is not in it; and how much gets fused depends on the device's code generation (a CPU's
    C++, a GPU's Triton), so another device's count is close, not equal. -> (GiB of all its
    kernels, GiB of its extern kernels among them: the matmuls, which inductor hands to the BLAS
    rather than generating, so the rest is what fusion decides)."""
    from torch._inductor import config, metrics
    log = logging.getLogger("torch._inductor.compile_fx.__inductor_metrics")
    level = log.level
    log.setLevel(logging.INFO)             # on: inductor counts (no handler: nothing printed)
    torch._dynamo.reset()
    metrics.reset()
    try:
        with config.patch(force_disable_caches=True), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "dynamo_pgo force disabled")   # what we asked for
            step()
    finally:
        log.setLevel(level)
    if not metrics.num_bytes_accessed:
        raise RuntimeError("inductor counted no bytes: step() compiled nothing")
    extern = sum(4 * n for node, n in metrics.nodes_num_elem if node.is_extern())  # bytes // 4
    return metrics.num_bytes_accessed / 2**30, extern / 2**30
