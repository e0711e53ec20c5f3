"""``run_perf``: model x methods x schemes x batch sizes -> gated latency/memory records + leaderboard.

Order of work (one model loaded once):

1. reference phase, float model on the device: the fp16 greedy reference, then for each
   (method, scheme) the method's state and the simulated model's reference on the gate sample;
2. the language model's float linears move to host memory, so that each engine's memory is its
   own: the deployed weights, the static cache, the graph pools, the shared vision tower;
3. for each batch size, for each variant (fp16 first, so ratios are against fp16 of the same
   call): build the real-kernel engine from the state, select kernels, compile + capture,
   gate, time, measure memory, append the record.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..models.layers import language_layers, select_linears
from ..quant.config import parse_scheme
from ..quant.simulated import apply_state
from ..quant.state import QuantState
from ..records import git_describe
from . import gate as gate_mod
from .arch import load_for_perf
from .engine import LlavaEngine, build_blocks
from .measure import copy_bandwidth, device_info, peak_memory, time_generate
from .real import RealLinear, select_kernels, set_compile
from ..records import append_record
from .records import write_perf_table

FLOAT_VARIANT = ("fp16", "w16a16")


# ---------------------------------------------------------------------------- workload

@dataclass
class Workload:
    input_ids: torch.Tensor  # [1, L]
    pixel_values: torch.Tensor  # [1, 3, S, S]
    image_tokens: int
    text_tokens: int
    new_tokens: int

    def batch(self, B: int):
        return self.input_ids.repeat(B, 1), self.pixel_values.repeat(B, 1, 1, 1)

    def describe(self) -> dict:
        return {"image_tokens": self.image_tokens, "text_tokens": self.text_tokens,
                "prompt_tokens": int(self.input_ids.shape[1]), "new_tokens": self.new_tokens,
                "image_size": int(self.pixel_values.shape[-1]), "eos": "ignored (forced length)",
                "inputs": "random token ids + one random normalised image (systems benchmark)"}


def make_workload(config, *, text_tokens: int = 70, new_tokens: int = 128, seed: int = 0) -> Workload:
    """One image (576 tokens at 336 px / patch 14) inside ~``text_tokens`` random text tokens."""
    vc = config.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2
    if getattr(config, "vision_feature_select_strategy", "default") == "full":
        n_img += 1
    image_token = getattr(config, "image_token_id", None)
    if image_token is None:
        image_token = config.image_token_index
    vocab = config.text_config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    hi = min(vocab, 32000)
    text = torch.randint(3, hi, (text_tokens,), generator=gen)
    text[text == image_token] = 3
    bos = getattr(config.text_config, "bos_token_id", 1) or 1
    head = 5  # "<s> USER :" before the image, the question and " ASSISTANT:" after it
    ids = torch.cat([torch.tensor([bos]), text[: head - 1], torch.full((n_img,), image_token),
                     text[head - 1:]])
    pix = torch.randn(1, 3, vc.image_size, vc.image_size, generator=gen)
    return Workload(ids[None], pix, n_img, text_tokens + 1, new_tokens)


# ---------------------------------------------------------------------------- methods & states

def method_class(name: str):
    """The registered method class; tolerates sibling method modules that cannot import here."""
    from .. import registry

    try:
        return registry.get_method(name)
    except (ImportError, ModuleNotFoundError):
        import importlib

        for pkg in registry.IN_TREE_PACKAGES:
            try:
                importlib.import_module(f"{pkg}.{name}")
            except ImportError:
                continue
        if name in registry._REGISTRY:
            return registry._REGISTRY[name]
        raise


def random_calibration(lm, workload: Workload, n: int = 4):
    """Random calibration batches for methods that need data (systems benchmarking only)."""
    from ..calibration import CalibrationSet

    cfg = lm.model.config
    image_token = getattr(cfg, "image_token_id", None)
    image_token = cfg.image_token_index if image_token is None else image_token
    vocab = min(cfg.text_config.vocab_size, 32000)
    ids, pix = workload.batch(1)
    gen = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(n):
        b_ids = ids.clone()
        txt = b_ids != image_token
        txt[:, 0] = False  # keep BOS
        b_ids[txt] = torch.randint(3, vocab, (int(txt.sum()),), generator=gen)
        b_ids[txt & (b_ids == image_token)] = 3
        labels = torch.full_like(b_ids, -100)
        labels[:, -8:] = b_ids[:, -8:]
        batches.append({"input_ids": b_ids.to(lm.device),
                        "attention_mask": torch.ones_like(b_ids).to(lm.device),
                        "pixel_values": torch.randn(pix.shape, generator=gen).to(lm.device, lm.dtype),
                        "labels": labels.to(lm.device)})
    return CalibrationSet(batches=batches, source={"kind": "random", "n": n,
                                                   "note": "random tokens and images: systems benchmark"})


# ---------------------------------------------------------------------------- helpers

def _bytes_of(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t is None or t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def weight_bytes(engine: LlavaEngine) -> dict:
    lang_lin = sum(m.weight_bytes() if isinstance(m, RealLinear) else _bytes_of(m)
                   for m in engine.linears().values())
    other = engine.lang.embed_tokens.weight
    norms = sum(b.ln1.numel() * b.ln1.element_size() + b.ln2.numel() * b.ln2.element_size()
                for b in engine.blocks)
    lm_head = engine.lm_head.weight
    lang = lang_lin + norms + other.numel() * other.element_size() + lm_head.numel() * lm_head.element_size() \
        + engine.lang.norm.weight.numel() * engine.lang.norm.weight.element_size()
    vision = _bytes_of(engine.model.model.vision_tower) + _bytes_of(engine.model.model.multi_modal_projector)
    return {"weight_bytes_language": int(lang), "weight_bytes_language_linears": int(lang_lin),
            "weight_bytes_vision": int(vision)}


def kernel_summary(engine: LlavaEngine) -> dict:
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


def _short_error(exc: BaseException) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {msg[:400]}"


@dataclass
class Variant:
    method: str
    scheme: str
    qcfg: object = None
    state: QuantState | None = None
    ref: gate_mod.SimReference | None = None
    quantize_s: float | None = None
    error: str | None = None
    proof: dict = field(default_factory=dict)

    @property
    def is_float(self) -> bool:
        return self.state is None or not self.state.linears

    @property
    def act_quant(self) -> bool:
        return self.qcfg is not None and self.qcfg.quantizes_acts


# ---------------------------------------------------------------------------- the run

def run_perf(model: str, methods=("rtn",), schemes=("w4a16", "w8a8", "w4a4", "w6a6"),
             batches=(1,), *, out: str | Path = "results/perf", suite: str = "perf",
             new_tokens: int = 128, text_tokens: int = 70, warmup: int = 5, reps: int = 20,
             gate: str = "auto", gate_tokens: int = 8, compile: bool = True, graphs: bool = True,
             device: str = "cuda", dtype: str = "fp16", seed: int = 0, overrides: dict | None = None,
             time_budget_s: float | None = None, kernels: list[str] | None = None,
             leaderboard: bool = True, log=print) -> list[dict]:
    """Benchmark ``model`` (architecture name, folder or Hub id); returns the records written.

    ``methods`` x ``schemes`` are quantized with the registered methods (random calibration where
    a method needs data); fp16 is always measured first as the baseline of the same call.
    """
    t_start = time.time()
    overrides = dict(overrides or {})
    out = Path(out)
    run_id = uuid.uuid4().hex[:12]
    torch.manual_seed(seed)
    info = device_info(device)
    bw = copy_bandwidth(device)
    log(f"[perf] {model} on {info.get('card')} (driver {info.get('driver')}, torch {info['torch']}); "
        f"copy bandwidth {bw and round(bw)} GB/s; run {run_id}")
    set_compile(compile and str(device).startswith("cuda"))

    t0 = time.time()
    lm = load_for_perf(model, dtype=dtype, device=device, seed=seed)
    log(f"[perf] model ready in {time.time() - t0:.1f}s")
    wl = make_workload(lm.model.config, text_tokens=text_tokens, new_tokens=new_tokens, seed=seed)
    ids1, pix1 = wl.batch(1)
    ids1, pix1 = ids1.to(device), pix1.to(device, lm.dtype)
    lang_path, _ = language_layers(lm.model)

    # 1. references (float model still on the device)
    variants = [Variant(*FLOAT_VARIANT, qcfg=parse_scheme("w16a16"))]
    variants[0].ref = gate_mod.simulated_reference(lm.model, ids1, pix1, gate_tokens)
    for m in methods:
        for s in schemes:
            v = Variant(m, s)
            variants.append(v)
            try:
                v.qcfg = parse_scheme(s, **overrides)
                cls = method_class(m)
                method = cls()
                calib = random_calibration(lm, wl) if cls.calibrates(v.qcfg) else None
                t0 = time.time()
                v.state = method.quantize(lm, v.qcfg, calib)
                if str(device).startswith("cuda"):
                    torch.cuda.synchronize()
                v.quantize_s = time.time() - t0
                v.proof = v.state.proof()
                handle = apply_state(lm.model, v.state, device=device)
                try:
                    v.ref = gate_mod.simulated_reference(lm.model, ids1, pix1, gate_tokens)
                    v.proof["act_quantizers_fired"] = gate_mod.fake_linears_fired(lm.model)
                finally:
                    handle.restore()
                log(f"[perf] {m} {s}: state in {v.quantize_s:.1f}s, {v.proof.get('quantized_linears')} "
                    f"linears, simulated reference done")
            except Exception as exc:  # noqa: BLE001 - one broken method must not stop the run
                v.error = _short_error(exc)
                log(f"[perf] {m} {s}: FAILED before timing: {v.error}")
                traceback.print_exc()
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()

    # 2. the float decoder linears leave the device
    float_linears = select_linears(lm.model, ["language"])
    float_linears = {n: l for n, l in float_linears.items() if n.startswith(lang_path)}
    for lin in float_linears.values():
        lin.to("cpu")
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()

    records = []
    common = {"suite": suite, "model": model, "task": None, "metric": "perf", "value": None,
              "stderr": None, "n_empty": None, "n_unparsed": None, "device": info.get("card"),
              "card": info.get("card"), "driver": info.get("driver"), "torch": info["torch"],
              "copy_bandwidth_gbs": bw, "versions": info, "git": git_describe(), "seed": seed,
              "run_id": run_id, "workload": wl.describe(), "model_path": lm.path,
              "command": " ".join(shlex.quote(a) for a in sys.argv)}

    def make_linear_for(v: Variant):
        def make(path, lin):
            lq = None if v.state is None else v.state.linears.get(path)
            if lq is None:
                if lin is None:
                    raise ValueError(f"{path}: neither in the state nor in the model")
                w = lin.weight.detach().to(device=device, dtype=lm.dtype)
                b = None if lin.bias is None else lin.bias.detach().to(device=device, dtype=lm.dtype)
                return RealLinear(w.shape[1], w.shape[0], weight=w, bias=b, name=path)
            return RealLinear.from_quant(lq, lin, device=device, dtype=lm.dtype, name=path)
        return make

    skipped = []
    for B in batches:
        for v in variants:
            skip = time_budget_s is not None and time.time() - t_start > time_budget_s
            rec = dict(common, method=v.method, scheme=v.scheme, batch_size=B,
                       quant_config=v.qcfg.to_dict() if v.qcfg is not None else None,
                       quantize_s=v.quantize_s, proof=v.proof, n=reps, latency=None, memory=None,
                       kernel=None, status="failed", error=v.error, gate=None,
                       config_hash=hashlib.sha256(json.dumps(
                           [model, v.method, v.qcfg.to_dict() if v.qcfg else v.scheme, B, wl.describe()],
                           sort_keys=True, default=str).encode()).hexdigest()[:16])
            if skip:
                skipped.append((v.method, v.scheme, B))
                rec["error"] = f"not run: time budget of {time_budget_s:.0f}s spent"
            elif v.error is None:
                engine = None
                try:
                    t_eval = time.time()
                    blocks = build_blocks(lm.model, make_linear_for(v))
                    engine = LlavaEngine(lm.model, blocks, compile=compile, graphs=graphs)
                    ids, pix = wl.batch(B)
                    engine.setup(ids, pix, new_tokens)
                    lin = []
                    for m_ in engine.linears().values():
                        lin.extend(m_.parts if hasattr(m_, "parts") else [m_])
                    sel = []
                    for phase, rows in (("decode", B), ("prefill", B * wl.input_ids.shape[1])):
                        sel += select_kernels(lin, phase, rows, dtype=lm.dtype, only=kernels,
                                              log=log)
                    for m_ in lin:
                        if isinstance(m_, RealLinear):
                            m_.finalize_storage()  # one weight layout per layer, as deployed
                    torch.cuda.empty_cache() if torch.cuda.is_available() else None
                    engine.capture()
                    ks = kernel_summary(engine)
                    rec["kernel"] = "; ".join(f"{p}={'+'.join(n)}" for p, n in ks.items())
                    rec["kernels"] = {**ks, "selection": [s.__dict__ for s in sel],
                                      "compiled_glue": engine.compiled,
                                      "cuda_graphs": sorted(engine.graphs) if engine.use_graphs else [],
                                      "graph_notes": engine.graph_notes}
                    g = gate_mod.check(engine, v.ref, act_quant=v.act_quant, policy=gate)
                    rec["gate"] = g
                    simulated = any("simulated" in n for n in ks["prefill"] + ks["decode"])
                    log(f"[perf] B={B} {v.method} {v.scheme}: gate {'PASS' if g['passed'] else 'FAIL'} "
                        f"(layerwise {g['layerwise_max_rel_err']:.2e}, e2e {g['e2e_rel_logit_err']:.2e}, "
                        f"tokens {'same' if g['e2e_tokens_match'] else 'DIFFER'}) kernels {rec['kernel']}")
                    if not g["passed"]:
                        rec["error"] = "correctness gate failed: not timed"
                    elif simulated:
                        rec["kernel"] = "simulated"
                        rec["status"] = "ok"
                        rec["error"] = "no real kernel for this scheme here: not timed (simulated)"
                    else:
                        lat = time_generate(engine, warmup=warmup, reps=reps)
                        mem = peak_memory(engine)
                        mem.update(weight_bytes(engine))
                        mem["kv_cache_bytes"] = int(sum(k.numel() * k.element_size() * 2 for k in engine.k_cache))
                        rec["latency"] = lat
                        rec["memory"] = mem
                        rec["status"] = "ok"
                        peak = mem["peak_bytes"] / 2**30 if mem.get("peak_bytes") else float("nan")
                        log(f"[perf] B={B} {v.method} {v.scheme}: ttft {lat['ttft_ms']:.2f} ms, decode "
                            f"{lat['decode_ms_per_token']:.3f} ms/tok (IQR {lat['iqr']['decode_ms_per_token']:.3f}), "
                            f"peak {peak:.2f} GiB")
                    rec["eval_s"] = time.time() - t_eval
                except Exception as exc:  # noqa: BLE001
                    rec["error"] = _short_error(exc)
                    log(f"[perf] B={B} {v.method} {v.scheme}: FAILED: {rec['error']}")
                    traceback.print_exc()
                finally:
                    if engine is not None:
                        engine.release()
                    engine = None
                    blocks = None
                    if str(device).startswith("cuda"):
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
            rec["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            append_record(out / "records.jsonl", rec)
            records.append(rec)
    if skipped:
        log(f"[perf] not run (time budget {time_budget_s}s): {skipped}")
    if leaderboard:
        write_perf_table(out / "records.jsonl", out / "leaderboard.md")
    log(f"[perf] done in {time.time() - t_start:.0f}s")
    return records
