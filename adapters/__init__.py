"""adapters: parameter-efficient fine-tuning (bitsandbytes + PEFT LoRA + TRL SFTTrainer) that tells the truth."""

__version__ = "0.1.0"
