"""The trainer behind `train.py`: TFDS input pipelines, ml_collections configs, Orbax checkpoints.

`import densenet_jax` (the models, kernel sets and weights) never imports this package; it needs
the `train` extra (`pip install 'densenet-jax[train]'`). Its modules, by concern, as the Flax
examples split theirs:

* `loop`: `train_and_evaluate` and `evaluate`, the loop over steps, evaluations and saves.
* `setup`: config -> mesh, data spec, model and train state; `config.init_from`.
* `registry`: config -> model, learning rate schedule, optimizer; `ConfigError`.
* `steps`: `TrainState` and the train and eval steps.
* `traced_step`: the train step jitted over the mesh, its trace kept between runs.
* `checkpoints`: Orbax checkpoints, unreadable ones set aside, preemption (SIGTERM).
* `reporting`: log lines, progress bar, TensorBoard, metrics.jsonl, curves.png.
* `sharding`: values between the hosts and the device mesh; `distributed`: several processes.
* `input_pipeline` and `preprocess`: deterministic, resumable TFDS pipelines and their image
  transforms; `randaugment`; `datasets`: the quickstart's `sklearn_digits`.

Nothing is imported here, so that `densenet_jax.train.steps` (say) is importable without TensorFlow.
"""
