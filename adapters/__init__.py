"""adapters: parameter-efficient fine-tuning (bitsandbytes + PEFT LoRA + TRL SFTTrainer) that tells the truth."""

from adapters.utils.errors import AdaptersError

__all__ = ["AdaptersError"]
__version__ = "0.1.0"
