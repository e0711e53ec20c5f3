"""Timing and memory of one engine: CUDA events around each phase, repeated, summarised robustly;
the bytes of its weights and the kernels it runs.

One repetition is one full generate of the fixed workload: vision encoder + projector, language
prefill (together: time to first token), then ``new_tokens - 1`` decode steps, each bracketed by
events. The summary per quantity is the median over repetitions with its interquartile range.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import time

import torch

from ..kernels.real import RealLinear


def quantiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {"median": None, "q1": None, "q3": None, "iqr": None, "n": 0}
    if len(xs) == 1:
        return {"median": xs[0], "q1": xs[0], "q3": xs[0], "iqr": 0.0, "n": 1}
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "iqr": q[2] - q[0], "n": len(xs)}


class Timer:
    """Events on CUDA, a host clock elsewhere (CPU tests)."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def ms(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def time_generate(engine, *, warmup: int = 5, reps: int = 20) -> dict:
    """Latency of ``engine``'s current batch: vision ms, TTFT, per-token decode ms, tokens/s."""
    timer = Timer(engine.device)
    n_dec = engine.new_tokens - 1
    for _ in range(warmup):
        engine.generate()
    timer.sync()
    vision, ttft, decode, total, steps = [], [], [], [], []
    for _ in range(reps):
        marks = [timer.mark()]
        engine.run_phase("vision")
        marks.append(timer.mark())
        engine.run_phase("prefill")
        marks.append(timer.mark())
        for _ in range(n_dec):
            engine.run_phase("decode")
            marks.append(timer.mark())
        timer.sync()
        vision.append(timer.ms(marks[0], marks[1]))
        ttft.append(timer.ms(marks[0], marks[2]))
        dec = timer.ms(marks[2], marks[-1])
        decode.append(dec / max(1, n_dec))
        total.append(timer.ms(marks[0], marks[-1]))
        steps.extend(timer.ms(marks[i], marks[i + 1]) for i in range(2, len(marks) - 1))
    B = engine.batch
    tot = quantiles(total)
    dec = quantiles(decode)
    return {
        "vision_ms": quantiles(vision)["median"],
        "ttft_ms": quantiles(ttft)["median"],
        "decode_ms_per_token": dec["median"],
        "tokens_per_s": B * engine.new_tokens / (tot["median"] / 1e3),
        "decode_tokens_per_s": B / (dec["median"] / 1e3),
        "prefill_ms": quantiles([t - v for t, v in zip(ttft, vision)])["median"],
        "generate_ms": tot["median"],
        "iqr": {"vision_ms": quantiles(vision)["iqr"], "ttft_ms": quantiles(ttft)["iqr"],
                "decode_ms_per_token": dec["iqr"], "generate_ms": tot["iqr"]},
        "decode_step_ms": quantiles(steps),
        "reps": reps, "warmup": warmup, "batch": B, "new_tokens": engine.new_tokens,
        "prompt_tokens": engine.prompt_len,
    }


def peak_memory(engine, exclude_bytes: int = 0) -> dict:
    """``max_memory_allocated`` over one generate after a reset (graph pools and cache included),
    less ``exclude_bytes`` held on the device for other purposes (allocations add up exactly)."""
    if not str(engine.device).startswith("cuda"):
        return {"peak_bytes": None, "resident_bytes": None}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    engine.generate()
    torch.cuda.synchronize()
    return {"peak_bytes": int(torch.cuda.max_memory_allocated()) - int(exclude_bytes),
            "resident_bytes": int(resident) - int(exclude_bytes), "excluded_bytes": int(exclude_bytes)}


def allocated_bytes(device) -> int | None:
    """``torch.cuda.memory_allocated`` of ``device`` after a synchronize; None off CUDA."""
    if not str(device).startswith("cuda"):
        return None
    torch.cuda.synchronize()
    return int(torch.cuda.memory_allocated(device))


def held_tensors(*objs) -> list[torch.Tensor]:
    """Every tensor ``objs`` hold: modules (parameters, buffers, and tensors kept in plain
    attributes: a ``RealLinear``'s layouts and codes), tensors, and dicts, lists, tuples and
    dataclasses of them (a gate reference), a few levels deep."""
    import dataclasses

    out: list[torch.Tensor] = []

    def walk(o, depth: int) -> None:
        if o is None or depth > 5:
            return
        if isinstance(o, torch.Tensor):
            out.append(o)
        elif isinstance(o, torch.nn.Module):
            for m in o.modules():
                out.extend(m.parameters(recurse=False))
                out.extend(b for b in m.buffers(recurse=False) if b is not None)
                for k, val in vars(m).items():
                    if not k.startswith("_") and not isinstance(val, torch.nn.Module):
                        walk(val, depth + 1)
        elif isinstance(o, dict):
            for val in o.values():
                walk(val, depth + 1)
        elif isinstance(o, (list, tuple, set)):
            for val in o:
                walk(val, depth + 1)
        elif dataclasses.is_dataclass(o) and not isinstance(o, type):
            for f in dataclasses.fields(o):
                walk(getattr(o, f.name, None), depth + 1)

    for o in objs:
        walk(o, 0)
    return out


def tensor_bytes(tensors, device_type: str = "cuda") -> int:
    """Bytes of the distinct storages of ``tensors`` on devices of ``device_type`` (a view and its
    base, or tied weights, count once), as the allocator counts them."""
    seen, total = set(), 0
    for t in tensors:
        if t.device.type != device_type or t.device.type == "meta":
            continue
        st = t.untyped_storage()
        if st.data_ptr() in seen:
            continue
        seen.add(st.data_ptr())
        total += st.nbytes()
    return total


def allocated_before(allocated: int | None, *known, device_type: str = "cuda") -> int | None:
    """``allocated`` (device bytes, ``allocated_bytes``) less the bytes of the tensors ``known`` holds
    (``held_tensors``: the float model, the variant's layers, the gate's references): what nobody
    accounts for, i.e. what earlier variants left behind (0 in a clean process, up to the
    allocator's rounding). None when ``allocated`` is (off CUDA)."""
    if allocated is None:
        return None
    return int(allocated) - tensor_bytes(held_tensors(*known), device_type)


def copy_bandwidth(device, nbytes: int = 1 << 30, reps: int = 10) -> float | None:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    if not str(device).startswith("cuda"):
        return None
    a = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / (statistics.median(times) / 1e3) / 1e9


def device_info(device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        info.update({"card": props.name, "sm_count": props.multi_processor_count,
                     "memory_bytes": props.total_memory, "cuda": torch.version.cuda,
                     "capability": f"{props.major}.{props.minor}"})
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            drv = out.stdout.strip().splitlines()[idx].split(", ")
            info.update({"driver": drv[0], "max_sm_clock": drv[1], "power_limit": drv[2]})
        except Exception:  # noqa: BLE001
            info["driver"] = None
    else:
        info.update({"card": platform.processor() or "cpu", "driver": None})
    return info


# ---------------------------------------------------------------------------- the engine's weights and kernels

def _bytes_of(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t is None or t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def weight_bytes(engine) -> dict:
    """Bytes of the engine's weights: language linears (every deployed layout), other language
    tensors (embeddings, LM head, norms), the vision tower and projector."""
    lang_lin = sum(m.weight_bytes() if isinstance(m, RealLinear) else _bytes_of(m)
                   for m in engine.linears().values())
    seen, other = set(), 0
    for t in engine.float_tensors().values():  # embeddings, LM head (tied: once), norms
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            other += t.numel() * t.element_size()
    vision = sum(_bytes_of(m) for m in engine.vision_modules())
    return {"weight_bytes_language": int(lang_lin + other), "weight_bytes_language_linears": int(lang_lin),
            "weight_bytes_vision": int(vision)}


def idle_float_bytes(model, engine) -> int:
    """Bytes of the float model's tensors on the device that ``engine`` does not use (decoder
    weights the engine holds quantized, and whatever the state replaced: norms, embeddings, a vision
    tower): held only to quantize later variants, so left out of the engine's memory figures."""
    used = engine.tensors_in_use()
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "cpu" or t.data_ptr() in used or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def kernel_summary(engine) -> dict:
    """Per phase, the kernels the engine's linears run (each name once, in order)."""
    out = {}
    for phase in ("prefill", "decode"):
        names = []
        for m in engine.linears().values():
            parts = m.parts if hasattr(m, "parts") else [m]
            for p in parts:
                lab = p.kernel_label(phase)
                if lab not in names:
                    names.append(lab)
        out[phase] = names
    return out


def engine_parts(engine) -> list:
    """The engine's linear layers, the parts of fused ones (q/k/v, gate/up) one by one."""
    out = []
    for m in engine.linears().values():
        out.extend(m.parts if hasattr(m, "parts") else [m])
    return out
