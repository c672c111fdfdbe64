"""Every use of another library's private internals, one module per library.

Each module names the versions it was checked against; tests/test_compat.py fails loudly when the upstream
behaviour a patch relies on changes, so an upgrade says what to revisit.

- ``compat.trl`` (trl 1.16.0): ``enable_trained_positions_only`` widens ``trl.trainer.utils._use_triton`` so the
  fused LM head scores only labelled positions on CPU/MPS; ``log_metric`` appends to ``SFTTrainer._metrics``;
  ``train_tokens`` / ``restore_train_tokens`` read and set ``SFTTrainer._total_train_tokens`` (num_tokens).
- ``compat.transformers`` (transformers 5.24.0): ``StagedCheckpoints`` overrides ``Trainer._save_checkpoint`` and
  ``Trainer._get_output_dir`` so checkpoints are written into a staging folder first, and ``Trainer._save`` so
  they can leave the tokenizer out.
- ``compat.huggingface_hub`` (huggingface_hub 2.4.0): ``client_timeout`` wraps the client factory kept in
  ``huggingface_hub.utils._http._GLOBAL_CLIENT_FACTORY`` to give requests a deadline.
- ``compat.bitsandbytes`` (bitsandbytes 0.50.2): ``keep_cpu_layout_trainable`` turns off
  ``Linear4bit.support_avx512bf16_for_cpu``, the CPU inference-only weight layout that breaks training.
"""
