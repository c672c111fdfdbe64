"""2 CPU processes (gloo) training a LoRA under FSDP2 or DDP with the pieces our training uses, then saving it.

`accelerate launch --multi_gpu --num_processes 2 tests/_fsdp_entry.py MODES QUANTS MODEL_DIR ROOT`
MODES: fsdp,ddp,zero2,zero3 (DeepSpeed with DS_ACCELERATOR=cpu); QUANTS: full,4bit (bnb NF4 with bnb_4bit_quant_storage = compute dtype = float32); each pair
writes ROOT/QUANT/MODE/{adapter,broken,result.json}.

accelerate turns FSDP off on CPU (``Accelerator(cpu=True)`` makes the state MULTI_CPU, and the Trainer passes
``use_cpu``), so the Trainer cannot run under FSDP here. This drives the same code instead: our model loading,
quantization and LoRA (``load_model``, ``attach_lora``), accelerate's own FSDP2 wrapping (``fsdp2_prepare_model``,
one ``fully_shard`` unit per decoder layer, as the fsdp2-qlora config asks), an accelerator whose ``get_state_dict``
takes its FSDP2 branch, and our save path (``gathered_adapter_state``, ``live_adapter_tensors``, ``save_adapter``,
the checkpoint check). Rank 0 writes result.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS, GLOBAL_BATCH, SEQ = 3, 8, 16


def build(mode: str, quant: str, model_dir: str, adapter: Path | None = None):
    """(recipe, tokenizer, peft model wrapped for MODE); ``adapter``: start from a saved adapter (a resume)."""
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    from adapters.config import load_recipe
    from adapters.model.loading import load_model, load_tokenizer
    from adapters.model.lora import attach_lora
    from adapters.model.sources import resolve_model

    ov = dict(model_name_or_path=model_dir, load_in_4bit=quant == "4bit", load_in_8bit=False, dtype="float32",
              bnb_4bit_compute_dtype="float32", bnb_4bit_quant_storage="float32", lora_dropout=0.0, r=4,
              gradient_checkpointing=False, base_kl_weight=0.0)  # fmt: skip
    # base_kl_weight 0: preflight refuses the forgetting guard under FSDP (docs/gpu.md, the first GPU run)
    recipe, _ = load_recipe("gemma3-270m-demo", ov)
    if mode == "fsdp":
        from adapters.planning.preflight import check, launch_from_config

        check(recipe, launch_from_config("fsdp2-qlora", num_processes=2))  # the recipe our FSDP2 config accepts
    ref = resolve_model(model_dir)
    torch.manual_seed(0)
    model = attach_lora(load_model(ref, recipe), recipe)
    if adapter is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(adapter / "adapter_model.safetensors")))
    acc = FSDP2OnCPU(cpu=True)
    if mode.startswith("zero"):
        return recipe, load_tokenizer(ref, recipe), deepspeed_engine(mode, recipe, model, acc), acc, ref
    if mode == "fsdp":
        acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", state_dict_type="FULL_STATE_DICT",
            reshard_after_forward=True, cpu_ram_efficient_loading=False,
        )  # fmt: skip
        model = fsdp2_prepare_model(acc, model)
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
    return recipe, load_tokenizer(ref, recipe), model, acc, ref


def deepspeed_engine(mode: str, recipe, model, acc):
    """DeepSpeed's engine (DS_ACCELERATOR=cpu, gloo) with the ZeRO stage of our shipped zero2 / zero3 config;
    ``acc`` is given accelerate's DeepSpeed branch of get_state_dict (the Trainer's path under DeepSpeed)."""
    import deepspeed

    from adapters.planning.preflight import check, launch_from_config

    launch = launch_from_config(mode, num_processes=2)
    check(recipe, launch)
    zero = {"stage": launch.zero_stage}
    if launch.zero3:
        zero["stage3_gather_16bit_weights_on_model_save"] = bool(launch.zero3_save_16bit)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_optimization": zero,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    acc.ds_stage, acc.deepspeed_config = launch.zero_stage, config
    acc.state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=launch.zero_stage))
    return engine


def _accelerator_class():
    from accelerate import Accelerator

    class FSDP2OnCPU(Accelerator):
        """accelerate's Accelerator, with its FSDP2 branches on for a model we sharded ourselves."""

        sharded = False
        ds_stage = None

        @property
        def is_fsdp2(self):
            return self.sharded

        @property
        def distributed_type(self):
            from accelerate.utils import DistributedType

            return DistributedType.DEEPSPEED if self.ds_stage else super().distributed_type

    return FSDP2OnCPU


def train_steps(model, vocab: int, rank: int, steps: int = STEPS) -> list[float]:
    """The same global batches in both modes: rank r takes rows [4r, 4r+4); gradients are averaged either way."""
    import torch

    gen = torch.Generator().manual_seed(1)
    engine = model if type(model).__name__ == "DeepSpeedEngine" else None  # it owns its optimizer and backward
    opt = None if engine else torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        ids = torch.randint(3, vocab, (GLOBAL_BATCH, SEQ), generator=gen)
        mine = ids[rank * 4 : rank * 4 + 4]
        loss = model(input_ids=mine, labels=mine).loss
        if engine:
            engine.backward(loss)
            engine.step()
        else:
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def main() -> int:
    modes, quants, model_dir, root = sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3], Path(sys.argv[4])
    global FSDP2OnCPU
    FSDP2OnCPU = _accelerator_class()
    from adapters.training.distributed import process_state

    state = process_state(120)
    for quant in quants:
        for mode in modes:
            one(mode, quant, model_dir, root / quant / mode, state)
    return 0


def one(mode: str, quant: str, model_dir: str, out: Path, state) -> None:
    FSDP2OnCPU.sharded = mode == "fsdp"
    recipe, tok, model, acc, ref = build(mode, quant, model_dir)
    losses = train_steps(model, len(tok), state.process_index)
    result = save_and_check(mode, model, acc, tok, ref, out / "adapter", state)
    state.wait_for_everyone()  # rank 0 has written the adapter the others load next
    # a resume: every rank loads the saved adapter into a fresh base, shards it, and gathers it back unchanged
    _, _, again, acc2, _ = build(mode, quant, model_dir, adapter=out / "adapter")
    live = _live(mode, again, acc2, state)
    if state.is_main_process:
        result["resume_roundtrip_max_diff"] = _max_diff(live, out / "adapter")
        result["losses"] = losses
        (out / "result.json").write_text(json.dumps(result))
    state.wait_for_everyone()


def _trainer(mode, model, acc, state):
    """What our save path reads from a Trainer."""
    module = model.module if mode.startswith("zero") else model  # the Trainer keeps the engine as model_wrapped
    return SimpleNamespace(
        is_fsdp_enabled=mode == "fsdp", is_deepspeed_enabled=mode.startswith("zero"), model=module,
        model_wrapped=model, accelerator=acc, args=SimpleNamespace(should_save=state.is_main_process),
    )  # fmt: skip


def _own_part(p):
    """What this rank holds of a tensor: a DTensor's shard (FSDP2), ZeRO-3's flat partition, else the tensor."""
    if hasattr(p, "to_local"):
        return p.to_local()
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


def _local_numel(p) -> int:
    return _own_part(p).numel()


def _live(mode, model, acc, state):
    from adapters.training.distributed import live_adapter_tensors

    return live_adapter_tensors(_trainer(mode, model, acc, state))  # a collective under FSDP


def _max_diff(live, adapter_dir: Path) -> float:
    from safetensors.torch import load_file

    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    assert saved.keys() == live.keys()
    return max(float((saved[k] - live[k]).abs().max()) for k in saved)


def save_and_check(mode, model, acc, tok, ref, out: Path, state) -> dict:
    """As run._finish and the checkpoint commit do: gather (every rank), write and check on rank 0; then write a
    save built from rank 0's own shards only, which the same check must refuse."""
    import torch

    from adapters.training.checkpoints import CheckpointError, validate_adapter_dir
    from adapters.training.distributed import gathered_adapter_state, lora_module_count
    from adapters.training.run import save_adapter

    trainer = _trainer(mode, model, acc, state)
    full = gathered_adapter_state(trainer)  # collective
    live = _live(mode, model, acc, state)  # collective
    if not state.is_main_process:
        return {}
    inner = acc.unwrap_model(trainer.model)
    params = [p for p in inner.parameters() if p.requires_grad]
    result = {
        "param_types": sorted({type(p).__name__ for p in inner.parameters()}),
        "trainable_local_numel": sum(_local_numel(p) for p in params),
        "trainable_full_numel": sum(p.numel() for p in params),
    }
    save_adapter(inner, tok, out, ref.path, state_dict=full)
    info = validate_adapter_dir(out, expected_modules=lora_module_count(inner), reference=live)
    result["saved"] = info
    named = dict(inner.named_parameters())
    own = {k: _own_part(named.get(k, v)).detach().clone() for k, v in inner.state_dict().items()}
    bad = out.parent / "broken"
    inner.save_pretrained(str(bad), state_dict={k: v.to(torch.float32) for k, v in own.items()})
    try:
        validate_adapter_dir(bad, expected_modules=lora_module_count(inner), reference=live)
        result["broken_refused"] = None
    except CheckpointError as e:
        result["broken_refused"] = str(e)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
