"""Training: the experiment config, the sharded train loop, optimizer, checkpoints and run folders.

  experiment      the config's sections, validated before anything compiles; model_config
  train           train_and_evaluate(config, workdir): the loop, evaluation, preemption
  optim           AdamW with warmup + cosine decay, clipping
  checkpointing   orbax checkpoints (resume, quarantine) and load_model (read-only)
  run_folder      one run per folder, one config per folder, room to save
  metrics_writer  metrics.jsonl, TensorBoard, the progress line
  distributed     multi-process initialization

Above the model, data and metrics modules; below analysis and the command-line tools.
"""
