"""demo: the whole job on the generated demo corpus (no download), ~10 min on 2 CPU cores."""

from nlmm_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.data.name = "demo"
  c.data.root = "data/demo_corpus"
  c.data.demo_num_images = 1000
  c.model.width = 128
  c.model.heads = 4
  c.model.depth = config_lib.ConfigDict(dict(text=1, image=1, audio=1))
  c.model.num_latents = 8
  c.model.embed_dim = 128
  c.model.image_size = 64
  c.model.patch_size = 8
  c.model.max_frames = 320
  c.model.max_text_len = 24
  c.model.vocab_size = 512
  c.train.batch_size = 64
  c.train.total_steps = 1500
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  return c
