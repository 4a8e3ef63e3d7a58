"""Paths of workdirs and checkpoints, local or in an object store (gs://, s3://, ...), via `etils.epath`.

Every file the trainer and the converter read or write goes through `as_path`: `pathlib` would
turn `gs://bucket/run` into the local folder `gs:/bucket/run`. `epath` is what Orbax and TFDS use
(through `tf.io.gfile` where TensorFlow is installed, else `fsspec`, e.g. `gcsfs`).
"""

import os

from etils import epath


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an `epath.Path`: a URI as it is, a local path with `~` expanded and made absolute."""
  text = os.fspath(path)
  if '://' in text:
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_local(path: epath.Path) -> bool:
  """Whether `path` is on this machine's filesystem (not gs://, s3://, ...)."""
  return '://' not in os.fspath(path)
