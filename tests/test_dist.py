"""Multi-process training through `accelerate launch` on CPU (gloo), accelerate configs, preflight, save checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapters.config import load_recipe
from tests.conftest import REPO, tiny_overrides

CONFIGS = sorted((REPO / "adapters" / "accelerate_configs").glob("*.yaml"))
ACCELERATE = Path(sys.executable).with_name("accelerate")


def launch_two(recipe: str, args: list[str], root: Path, port: int, timeout: int) -> subprocess.CompletedProcess:
    """`adapters train RECIPE ARGS` in a world of 2 CPU processes (gloo), each rank tracing into root/trace."""
    env = dict(
        os.environ,
        PYTHONPATH=str(REPO),
        ADAPTERS_TRACE_DIR=str(root / "trace"),
        ADAPTERS_TRACE_WATCH=str(root / "out"),
        OMP_NUM_THREADS="1",
    )
    cmd = [
        str(ACCELERATE),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(port),
        str(REPO / "tests" / "_dist_entry.py"),
        "train",
        recipe,
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _cli_args(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += [f"--{k}", str(v)]
    return out


@pytest.fixture(scope="module")
def ddp_run(tiny_models, tiny_data, tmp_path_factory):
    """One 2-process DDP run of a tiny Llama through `accelerate launch --multi_gpu --num_processes 2`."""
    root = tmp_path_factory.mktemp("ddp")
    ov = tiny_overrides(
        tiny_models["llama"],
        tiny_data,
        root / "out",
        max_steps=4,
        per_device_train_batch_size=4,
        lora_dropout=0.0,
        quant_probe=False,
        eval_base=False,
        eval_steps=2,
        save_steps=2,
        run_name="ddp",
        # the forgetting guard runs under DDP (unwrapped base forward, hooks), but with a weight too small to move
        # the loss: its sampled positions differ between 2 x 4 and 1 x 8, and the test below compares losses
        base_kl_weight=1e-9,
        base_kl_every=1,  # on every step, so every logged step carries base_kl (the demo applies it every 2nd)
    )
    proc = launch_two("gemma3-270m-demo", _cli_args(ov), root, port=29533, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    traces = {r: json.loads((root / "trace" / f"rank{r}.json").read_text()) for r in (0, 1)}
    return {"run": root / "out" / "ddp", "traces": traces, "overrides": ov, "root": root, "stdout": proc.stdout}


def test_ddp_two_processes_world_and_disjoint_data(ddp_run):
    manifest = json.loads((ddp_run["run"] / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["world_size"] == 2
    assert manifest["effective_batch_size"] == 4 * 1 * 2
    t0, t1 = ddp_run["traces"][0]["samples"], ddp_run["traces"][1]["samples"]
    assert len(t0) == len(t1) == 4 * 4  # 4 steps x micro-batch 4 on each rank
    assert not set(t0) & set(t1), "the two ranks trained on overlapping samples"
    assert len(set(t0) | set(t1)) == 32  # together: the whole 32-row split, once
    assert ddp_run["stdout"].count("[run] ") == 1  # logging on the main process only


def test_ddp_only_rank0_writes(ddp_run):
    run = ddp_run["run"]
    rank1 = ddp_run["traces"][1]["writes"]
    # rank 1 may only create the staging folder it writes its own RNG state into (for exact resume)
    outside = [w for w in rank1 if "/checkpoints/.staging" not in w[1]]
    assert outside == [], outside
    assert ddp_run["traces"][0]["writes"], "the audit hook saw no writes at all"
    for ckpt in sorted((run / "checkpoints").glob("checkpoint-*")):
        names = {p.name for p in ckpt.iterdir()}
        # both ranks' RNG states made it in before the main process validated and renamed the folder
        assert {"rng_state_0.pth", "rng_state_1.pth", "COMPLETE.json", "adapter_model.safetensors"} <= names
    from adapters.training.checkpoints import validate_adapter_dir

    info = validate_adapter_dir(run / "adapter", expected_modules=2 * 7)  # 2 layers x 7 linear modules
    assert info["lora_B"] == 14


def test_ddp_loss_matches_one_process(ddp_run, tiny_models, tiny_data):
    """Same effective batch (2 x 4 vs 1 x 8), same seed: the same samples per step, the same losses."""
    from adapters.training.run import train

    ov = dict(
        ddp_run["overrides"], per_device_train_batch_size=8, run_name="one", output_root=str(ddp_run["root"] / "one")
    )
    recipe, path = load_recipe("gemma3-270m-demo", ov)
    run = train(recipe, path)
    one = json.loads((run / "manifest.json").read_text())
    two = json.loads((ddp_run["run"] / "manifest.json").read_text())
    assert one["world_size"] == 1 and one["effective_batch_size"] == 8
    l1 = [h["loss"] for h in one["log_history"] if "loss" in h]
    l2 = [h["loss"] for h in two["log_history"] if "loss" in h]
    assert len(l1) == len(l2) == 4
    assert all("base_kl" in h for h in two["log_history"] if "loss" in h)  # the guard ran in both processes' loss
    assert l1 == pytest.approx(l2, rel=1e-3)
    assert one["train"]["train_loss"] == pytest.approx(two["train"]["train_loss"], rel=1e-3)


# ---------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_accelerate_config_validates(path):
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(path))  # accelerate's own ClusterConfig: unknown keys or bad types raise
    raw = yaml.safe_load(path.read_text())
    for key in (
        "compute_environment",
        "distributed_type",
        "num_processes",
        "num_machines",
        "machine_rank",
        "mixed_precision",
        "use_cpu",
    ):
        assert key in raw, f"{path.name}: missing {key}"
    assert path.read_text().startswith("#"), f"{path.name}: starts with a comment saying how to run it"
    dist = str(cfg.distributed_type.value if hasattr(cfg.distributed_type, "value") else cfg.distributed_type)
    if dist == "FSDP":
        f = raw["fsdp_config"]
        assert f["fsdp_version"] == 2 and f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert f["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if dist == "DEEPSPEED":
        d = raw["deepspeed_config"]
        assert d["zero_stage"] in (2, 3)
        if d["zero_stage"] == 3:
            assert d["zero3_save_16bit_model"] is True
    if raw["num_machines"] > 1:
        assert {"main_process_ip", "main_process_port", "machine_rank"} <= set(raw)


def test_shipped_set_is_complete():
    from adapters.planning.preflight import launch_from_config

    kinds = {p.stem: launch_from_config(p) for p in CONFIGS}
    assert kinds["single-gpu"].num_processes == 1
    assert kinds["ddp"].distributed_type == "MULTI_GPU"
    assert kinds["fsdp2-qlora"].fsdp and kinds["fsdp2-qlora"].fsdp_version == 2
    assert kinds["zero2"].zero_stage == 2 and kinds["zero3"].zero3 and kinds["zero3"].zero3_save_16bit
    assert kinds["multi-node"].num_processes == 16


def test_make_train_nproc_uses_accelerate_launch():
    def dry(*args):
        return subprocess.run(["make", "-n", "train", *args], cwd=REPO, capture_output=True, text=True).stdout

    assert "accelerate launch --num_processes 2 --multi_gpu" in dry("NPROC=2")
    assert "-m adapters train gemma3-270m-demo" in dry("NPROC=2")
    out = dry("NPROC=4", "ACCELERATE_CONFIG=fsdp2-qlora")
    assert "--config_file adapters/accelerate_configs/fsdp2-qlora.yaml" in out
    out = dry("NPROC=16", "ACCELERATE_CONFIG=multi-node", "NODE_RANK=1", "MAIN_ADDR=10.0.0.1", "MAIN_PORT=29501")
    assert "--machine_rank 1 --main_process_ip 10.0.0.1 --main_process_port 29501" in out
    out = dry("NPROC=32", "ACCELERATE_CONFIG=fsdp2-qlora", "NODES=4", "NODE_RANK=3", "MAIN_ADDR=n0", "MAIN_PORT=1")
    assert "--num_processes 32 --config_file adapters/accelerate_configs/fsdp2-qlora.yaml --num_machines 4" in out
    assert "accelerate" not in dry()


# ---------------------------------------------------------------------------------------------------- preflight
def _recipe(**kw):
    return load_recipe("llama-3.2-1b-qlora", kw)[0]


def _problems(recipe, launch, config=None):
    from adapters.planning.preflight import problems

    return "\n".join(problems(recipe, launch, config))


def test_preflight_rejects_each_bad_combination():
    from types import SimpleNamespace

    from adapters.planning.preflight import Launch, launch_from_config

    fsdp = launch_from_config("fsdp2-qlora", num_processes=2)
    zero3 = launch_from_config("zero3", num_processes=2)
    ddp = Launch(2, "MULTI_GPU")
    assert "ZeRO-3 with load_in_4bit" in _problems(_recipe(), zero3)
    assert "fsdp2-qlora" in _problems(_recipe(), zero3)  # the fix is named
    msg = _problems(_recipe(), fsdp)
    assert "bnb_4bit_quant_storage" in msg and "--bnb_4bit_quant_storage bfloat16" in msg
    assert "device_map='auto' with 2 processes" in _problems(_recipe(device_map="auto"), ddp)
    assert "remove device_map" in _problems(_recipe(model_init_kwargs={"device_map": "auto"}), ddp)
    msg = _problems(_recipe(packing=True, packing_strategy="wrapped"), Launch())
    assert "packing" in msg and "--packing_strategy bfd" in msg
    gemma = SimpleNamespace(model_type="gemma3_text", dtype="float32")
    assert "fp16 on a bf16-only model" in _problems(_recipe(fp16=True, bf16=False), Launch(), gemma)
    bf16cfg = SimpleNamespace(model_type="llama", dtype="bfloat16")
    assert "--bf16 true" in _problems(_recipe(fp16=True, bf16=False), Launch(), bf16cfg)
    # the forgetting guard under FSDP: failed on the first GPU run, in TRL's fused LM head backward (docs/gpu.md)
    guarded = _recipe(bnb_4bit_quant_storage="bfloat16", base_kl_weight=0.5)
    msg = _problems(guarded, fsdp)
    assert "FSDP with the forgetting guard (base_kl_weight 0.5)" in msg and "Fix: --base_kl_weight 0" in msg
    assert _problems(guarded, ddp) == "" and _problems(guarded, Launch()) == ""  # the guard runs under DDP


def test_preflight_accepts_good_combinations():
    from types import SimpleNamespace

    from adapters.planning.preflight import Launch, launch_from_config

    llama = SimpleNamespace(model_type="llama", dtype="bfloat16")
    fsdp = launch_from_config("fsdp2-qlora", num_processes=2)
    assert _problems(_recipe(bnb_4bit_quant_storage="bfloat16"), fsdp, llama) == ""
    assert _problems(_recipe(), launch_from_config("zero2"), llama) == ""
    assert _problems(_recipe(load_in_4bit=False), launch_from_config("zero3"), llama) == ""
    assert _problems(_recipe(), Launch(2, "MULTI_GPU"), llama) == ""
    assert _problems(_recipe(device_map="auto"), Launch(), llama) == ""  # one process may spread one model
    assert _problems(_recipe(packing=True), Launch(), llama) == ""  # bfd: isolated by position ids


def test_preflight_reads_the_launcher_environment():
    from adapters.planning.preflight import launch_from_env

    env = {
        "WORLD_SIZE": "4",
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
        "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "false",
    }
    launch = launch_from_env(env)
    assert launch.zero3 and launch.num_processes == 4
    msg = _problems(_recipe(load_in_4bit=False), launch)
    assert "zero3_save_16bit_model: true" in msg
    launch = launch_from_env({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    assert launch.fsdp and launch.fsdp_version == 2


def test_train_runs_preflight_first(tiny_models, tiny_data, tmp_path, monkeypatch, capsys):
    """Under a ZeRO-3 launch a 4-bit recipe stops before loading anything, exit code 2, fix named."""
    from adapters.cli import main

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    ov = tiny_overrides(tiny_models["llama"], tiny_data, tmp_path, load_in_4bit=True, run_name="z3")
    rc = main(["train", "gemma3-270m-demo", *_cli_args(ov)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "ZeRO-3 with load_in_4bit" in err and "fsdp2-qlora" in err
    assert not (tmp_path / "z3" / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------------- save checks
def test_validation_counts_keys_against_targeted_modules(ddp_run, tmp_path):
    """A distributed save that lost modules (e.g. one rank's shard only) fails validation: never marked complete."""
    import shutil

    from safetensors.torch import load_file, save_file

    from adapters.training.checkpoints import CheckpointError, validate_adapter_dir

    src = ddp_run["run"] / "adapter"
    bad = tmp_path / "adapter"
    shutil.copytree(src, bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    dropped = sorted(k for k in tensors if "lora_B" in k)[0]
    del tensors[dropped]
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="expected 14 of each"):
        validate_adapter_dir(bad, expected_modules=14)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    tensors = {k: (v[:0] if "lora_A" in k else v) for k, v in tensors.items()}  # ZeRO-3 without gather: empty
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="empty"):
        validate_adapter_dir(bad, expected_modules=14)


def test_gathered_state_is_none_without_sharding():
    from types import SimpleNamespace

    from adapters.training.distributed import gathered_adapter_state, sharding

    trainer = SimpleNamespace(is_fsdp_enabled=False, is_deepspeed_enabled=False)
    assert sharding(trainer) is None and gathered_adapter_state(trainer) is None
    assert sharding(SimpleNamespace(is_fsdp_enabled=True)) == "fsdp"


# ---------------------------------------------------------------------------------------------------- multi-node
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trace_env(root: Path, **extra) -> dict:
    return dict(
        os.environ,
        PYTHONPATH=str(REPO),
        ADAPTERS_TRACE_DIR=str(root / "trace"),
        ADAPTERS_TRACE_WATCH=str(root / "out"),
        OMP_NUM_THREADS="1",
        **extra,
    )


def run_nodes(cmds: list[list[str]], envs: list[dict], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Start one launcher per "node" at once (they rendezvous with each other) and wait for all, bounded."""
    procs = [
        subprocess.Popen(c, env=e, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c, e in zip(cmds, envs)
    ]
    out = []
    try:
        for c, p in zip(cmds, procs):
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(c, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def make_train_line(node_rank: int, port: int, overrides: dict) -> list[str]:
    """The command `make train NPROC=2 ACCELERATE_CONFIG=multi-node NODE_RANK=.. MAIN_ADDR=127.0.0.1 MAIN_PORT=..`
    runs, with the traced entry point in place of `-m adapters` (and the venv's accelerate)."""
    import shlex

    dry = subprocess.run(
        ["make", "-n", "--no-print-directory", "train", "NPROC=2", "ACCELERATE_CONFIG=multi-node"]
        + [f"NODE_RANK={node_rank}"]
        + ["MAIN_ADDR=127.0.0.1", f"MAIN_PORT={port}", "ARGS=" + shlex.join(_cli_args(overrides))],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    words = shlex.split(dry.splitlines()[-1])
    assert words[0].endswith("accelerate") and words[words.index("-m") + 1] == "adapters"
    i = words.index("-m")
    return [str(ACCELERATE), *words[1:i], str(REPO / "tests" / "_dist_entry.py"), *words[i + 2 :]]


@pytest.fixture(scope="module")
def multi_node_run(ddp_run, tmp_path_factory):
    """The DDP run's recipe as 2 "nodes" x 1 process on localhost: two launches of the make train line."""
    root = tmp_path_factory.mktemp("multinode")
    ov = dict(ddp_run["overrides"], output_root=str(root / "out"), run_name="mn")
    port = free_port()
    done = run_nodes([make_train_line(r, port, ov) for r in (0, 1)], [trace_env(root)] * 2)
    for r, p in enumerate(done):
        assert p.returncode == 0, f"node {r}: " + p.stdout[-3000:] + p.stderr[-3000:]
    traces = {r: json.loads((root / "trace" / f"rank{r}.json").read_text()) for r in (0, 1)}
    return {"run": root / "out" / "mn", "traces": traces, "stdout": done[0].stdout + done[1].stdout}


def adapter_max_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    return max(float((ta[k] - tb[k]).abs().max()) for k in ta)


def test_multi_node_world_manifest_and_adapter(multi_node_run, ddp_run):
    manifest = json.loads((multi_node_run["run"] / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["world_size"] == 2
    assert manifest["num_machines"] == 2  # two launches on one host: counted by node rank, not host name
    assert [(r["rank"], r["node_rank"], r["local_rank"]) for r in manifest["ranks"]] == [(0, 0, 0), (1, 1, 0)]
    assert all(r["host"] for r in manifest["ranks"])
    single = json.loads((ddp_run["run"] / "manifest.json").read_text())
    assert single["num_machines"] == 1 and [r["node_rank"] for r in single["ranks"]] == [0, 0]
    # same seed, same effective batch (2 x 4) as the single-node 2-process run: the same adapter
    assert manifest["effective_batch_size"] == single["effective_batch_size"] == 8
    assert adapter_max_diff(multi_node_run["run"] / "adapter", ddp_run["run"] / "adapter") <= 1e-6
    assert multi_node_run["stdout"].count("[run] ") == 1  # logging on global rank 0 only


def test_multi_node_only_global_rank0_writes(multi_node_run):
    rank1 = multi_node_run["traces"][1]["writes"]
    assert [w for w in rank1 if "/checkpoints/.staging" not in w[1]] == []  # its RNG state only, as under DDP
    assert multi_node_run["traces"][0]["writes"]
    for ckpt in sorted((multi_node_run["run"] / "checkpoints").glob("checkpoint-*")):
        assert {"rng_state_0.pth", "rng_state_1.pth", "COMPLETE.json"} <= {p.name for p in ckpt.iterdir()}


@pytest.mark.slow  # ~20 s; the fast suite forms the same 2 x 1 world through the make train line above
def test_slurm_launch_line_two_nodes(ddp_run, tmp_path):
    """scripts/slurm/launch.sh (what train.sbatch runs on each node through srun), with SLURM's variables set by
    hand: 2 "nodes" x 1 process on localhost form one world and train the DDP run's adapter."""
    ov = dict(ddp_run["overrides"], output_root=str(tmp_path / "out"), run_name="slurm")
    common = dict(
        SLURM_JOB_NUM_NODES="2",
        SLURM_JOB_NODELIST="localhost,otherhost",  # node 0 is the first host
        GPUS_PER_NODE="1",
        MAIN_PORT=str(free_port()),
        ACCELERATE=str(ACCELERATE),
        ENTRY=str(REPO / "tests" / "_dist_entry.py"),
    )
    cmd = ["bash", str(REPO / "scripts" / "slurm" / "launch.sh"), "gemma3-270m-demo", *_cli_args(ov)]
    envs = [trace_env(tmp_path, SLURM_NODEID=str(r), **common) for r in (0, 1)]
    done = run_nodes([cmd, cmd], envs)
    for r, p in enumerate(done):
        assert p.returncode == 0, f"node {r}: " + p.stdout[-3000:] + p.stderr[-3000:]
        assert f"[slurm] node {r}/2" in p.stderr and "main localhost:" in p.stderr
    manifest = json.loads((tmp_path / "out" / "slurm" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["num_machines"] == 2
    assert adapter_max_diff(tmp_path / "out" / "slurm" / "adapter", ddp_run["run"] / "adapter") <= 1e-6
    sbatch = (REPO / "scripts" / "slurm" / "train.sbatch").read_text()
    assert "srun" in sbatch and "scripts/slurm/launch.sh" in sbatch and "#SBATCH --ntasks-per-node=1" in sbatch


def test_refused_run_under_launcher_prints_once(ddp_run, tmp_path):
    """A user's mistake under `accelerate launch` (here: the run exists, no --resume): our line once, from rank 0,
    no traceback from our processes, the launcher fails (exit 1), and its failure summary quotes our line."""
    root = ddp_run["root"]
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    cmd += ["-m", "adapters", "train", "gemma3-270m-demo", *_cli_args(ddp_run["overrides"])]
    proc = subprocess.run(cmd, env=trace_env(tmp_path), capture_output=True, text=True, timeout=120, cwd=REPO)
    line = f"adapters train: error: {root / 'out' / 'ddp'} already exists; pass --resume"
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.count(line) == 1 + 2, proc.stderr  # printed once; twice in the launcher's summary
    assert proc.stderr.count("traceback : adapters train: error:") == 2  # rank 0 and rank 1 wrote the error file
    assert "exitcode  : 2" in proc.stderr, proc.stderr
    ours = proc.stderr.split("Traceback (most recent call last)")[0]  # what precedes the launcher's own traceback
    assert "adapters/" not in ours.replace(str(root), "")  # no frame of ours
