"""The settings of the harness tests' real runs (tiny BERT, tiny data)."""

# A tiny real run: 64 movie reviews of at most 32 tokens, batches of 8, a few steps. Shared by the
# experiment-file test and the table test, so their runs compile the same programs (a constant
# learning rate: the number of steps is not a constant of the compiled step).
TINY = {
    "data.max_train_examples": 64, "data.max_eval_examples": 32, "data.max_length": 32,
    "data.bucket_boundaries": "32", "train.batch_size": 8, "train.eval_batch_size": 8,
    "train.learning_rate": 1e-3, "train.warmup_ratio": 0.0, "train.schedule": "constant",
    "train.log_every": 1, "train.progress": False,
}
