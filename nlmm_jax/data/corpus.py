"""The corpus a config names (`data.name`) and its index, read by the reader that fits.

  data.name    corpus path       reader
  "demo"       data.root         flickr8k.load_index (pipeline.prepare generates it first)
  "flickr8k"   data.root         flickr8k.load_index
  "manifest"   data.manifest     manifest.load_index (a JSONL file, see data/manifest.py)
  "tfds:<name>"  no path: data/tfds_source.py reads it (pipeline.prepare dispatches)

Both readers return a `flickr8k.Flickr8kIndex`, so everything downstream (feature cache,
grain pipeline, retrieval) is the same for every corpus.
"""

import os
from typing import Optional

from nlmm_jax import config_lib
from nlmm_jax.data import flickr8k
from nlmm_jax.data import manifest


def corpus_path(data, override: Optional[str] = None) -> str:
  """Absolute path of the corpus of `data` (the config's data section): the manifest
  file for "manifest", else the root folder; `override` replaces the configured path."""
  if override is None:
    config_lib.check_data(data)
    override = data.manifest if data.name == "manifest" else data.root
  else:
    config_lib.check_data_name(data.name)
  if data.name.startswith(config_lib.TFDS_PREFIX):
    raise ValueError(f"data.name={data.name!r} is a TFDS dataset, read through "
                     "tfds.data_source (nlmm_jax/data/tfds_source.py), not from a path of "
                     "image and audio files")
  return os.path.abspath(os.path.expanduser(os.fspath(override)))


def load_index(data, path: Optional[str] = None, report_path=None
               ) -> flickr8k.Flickr8kIndex:
  """The index of the corpus at `path` (default: `corpus_path(data)`), read with
  data.use_audio and data.max_lost_fraction; the loss report goes to `report_path`."""
  path = corpus_path(data, path)
  reader = manifest.load_index if data.name == "manifest" else flickr8k.load_index
  return reader(path, use_audio=bool(data.use_audio),
                max_lost_fraction=float(data.max_lost_fraction), report_path=report_path)
