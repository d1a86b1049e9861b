"""small: the Flickr8k + FACC recipe (d=512, 8 heads, depth 6 per modality)."""

from nlmm_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.data.name = "flickr8k"
  c.data.root = "data/flickr8k"      # see scripts/download_flickr8k.sh
  c.model.width = 512
  c.model.heads = 8
  c.model.depth = config_lib.ConfigDict(dict(text=6, image=6, audio=6))
  c.model.num_latents = 32
  c.model.embed_dim = 512
  c.model.image_size = 224
  c.model.patch_size = 8             # 784 patches, the Flickr8k shape of the design
  c.model.max_frames = 1024          # 10.24 s of 10 ms frames; 256 after the x4 front-end
  c.model.max_text_len = 77
  c.model.vocab_size = 8000
  c.model.memory.chunk_size = 64
  levels = c.model.cms.levels
  levels.fast.update_every, levels.mid.update_every, levels.slow.update_every = 1, 16, 256
  c.train.batch_size = 128
  c.train.total_steps = 20000
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 1000
  for lvl in levels.values():
    lvl.lr = 5e-4
  return c
