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
