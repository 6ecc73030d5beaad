"""The training side of cosformer: typed configs (`config`), the Accelerate loop (`trainer`), atomic checkpoints
(`checkpoint`), metrics to wandb and a local JSONL log (`tracking`), data (`data`) and the tasks the loop trains
(`tasks`: byte-level language modelling, text-to-image). `import cosformer` does not import this package: the model
zoo needs none of accelerate, datasets or wandb."""
