"""A tiny demo-config job shared by the tests (20 generated images, d = 32, 4 steps)."""

from nlmm_jax import config_lib

# The demo config shrunk to seconds: 20 images, width 32, one block per modality.
TINY_OVERRIDES = [
    "data.demo_num_images=20", "data.eval_batch_size=8",
    "model.width=32", "model.heads=2", "model.mlp_mult=2", "model.num_latents=4",
    "model.embed_dim=32", "model.image_size=16", "model.patch_size=8", "model.max_frames=48",
    "model.max_text_len=16", "model.vocab_size=64", "model.depth.text=1",
    "model.depth.image=1", "model.depth.audio=1", "model.memory.chunk_size=8",
    "optim.warmup_steps=1", "train.batch_size=4", "train.total_steps=4", "train.log_every=1",
    "train.eval_every=2", "train.checkpoint_every=2", "train.progress_bar=False",
]


def tiny_overrides(root, cache) -> list[str]:
  """TINY_OVERRIDES with the corpus and cache folders (command-line syntax)."""
  return TINY_OVERRIDES + [f"data.root={root}", f"data.cache_dir={cache}"]


def tiny_config(root, cache, **train_overrides):
  c = config_lib.load_config("demo", tiny_overrides(root, cache))
  for k, v in train_overrides.items():
    c.train[k] = v
  return c


def train_two_then_four(config, workdir, caplog):
  """Trains `config` to step 2, then on to 4 in the same workdir, checking that the second
  run resumed from the step-2 checkpoint and that every logged step's loss is finite.
  Returns (the final test metrics, the rows of train_metrics.jsonl); `caplog` holds the
  absl log of both runs."""
  import json  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  import math  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  from nlmm_jax import train  # pylint: disable=g-import-not-at-top
  with caplog.at_level(logging.INFO, logger="absl"):
    config.train.total_steps = 2
    train.train_and_evaluate(config, str(workdir))
    config.train.total_steps = 4
    test_metrics = train.train_and_evaluate(config, str(workdir))
  assert re.search(r"Resumed from \S*checkpoints step 2", caplog.text)
  with open(f"{workdir}/train_metrics.jsonl") as f:
    lines = [json.loads(l) for l in f]
  assert [r["step"] for r in lines] == [1, 2, 3, 4]
  assert all(math.isfinite(r["train/loss"]) for r in lines)
  return test_metrics, lines
