"""tiny: d=128, a CPU-friendly model for quick experiments on Flickr8k + FACC."""

from nlmm_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.data.name = "flickr8k"
  c.data.root = "data/flickr8k"
  c.model.width = 128
  c.model.heads = 4
  c.model.depth = config_lib.ConfigDict(dict(text=2, image=2, audio=2))
  c.model.num_latents = 16
  c.model.embed_dim = 128
  c.model.image_size = 96
  c.model.patch_size = 16
  c.model.max_frames = 400
  c.model.max_text_len = 40
  c.model.vocab_size = 4000
  c.train.batch_size = 64
  c.train.total_steps = 5000
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  return c
