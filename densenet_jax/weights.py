"""Pretrained ImageNet weights in one call, without torch: `densenet_jax.pretrained('densenet121')`.

torchvision's published DenseNet weights are on the Hugging Face Hub as safetensors files in
timm's repositories (`timm/densenet121.tv_in1k`, torchvision's keys), and so are timm's own,
better-trained ones (`densenet121.ra_in1k`, `densenetblur121d.ra_in1k`, named as timm names them).
Each entry says how its publisher evaluated it (input size, crop fraction, interpolation,
mean/std), which `train.py --config.mode=eval --config.init_from=NAME` uses. They are fetched with
`huggingface_hub` (its cache, `revision` and offline mode: `HF_HUB_OFFLINE=1`, `HF_HOME`,
`HF_ENDPOINT` work as for any Hub download), read with `safetensors` as numpy arrays (no torch,
no pickle) and converted with `from_torchvision`, which checks every key and shape against the
model. As with timm's `create_model(name, pretrained=True)`, `num_classes` other than the
weights' 1,000 gives a new classifier; `'hf-hub:OWNER/REPO'` loads any DenseNet in that layout.
"""

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from densenet_jax.models import (
  DenseNet,
  DenseNet121,
  DenseNet161,
  DenseNet169,
  DenseNet201,
  DenseNetBlur121d,
  dense_kernel_init,
)
from densenet_jax.torchvision_port import (
  config_from_variables,
  from_torchvision,
  load_state_dict,
)

FILENAME = 'model.safetensors'
HUB_PREFIX = 'hf-hub:'


IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@dataclasses.dataclass(frozen=True)
class Weights:
  """Where a set of pretrained weights lives, how its publisher evaluated it, and what it measured.

  Attributes:
    repo_id: the Hugging Face Hub repository.
    model: the architecture.
    top1, top5: ImageNet validation accuracy (%), as published by `source`, evaluated as below.
    source: who published the figures (torchvision's docs; timm's results-imagenet.csv).
    input_size: the evaluation's square input.
    crop_fraction: the center crop's share of the resized short side (input_size / resize).
    interpolation: of the (antialiased) resize: 'bilinear' or 'bicubic'.
    mean, std: per RGB channel, 0-255 units.
  """

  repo_id: str
  model: Callable[..., DenseNet]
  top1: float
  top5: float
  source: str
  input_size: int = 224
  crop_fraction: float = 0.875
  interpolation: str = 'bilinear'
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD


PRETRAINED: dict[str, Weights] = {
  # torchvision's: evaluated with Resize(256) + CenterCrop(224), bilinear.
  'densenet121': Weights('timm/densenet121.tv_in1k', DenseNet121, 74.434, 91.972, 'torchvision'),
  'densenet161': Weights('timm/densenet161.tv_in1k', DenseNet161, 77.138, 93.560, 'torchvision'),
  'densenet169': Weights('timm/densenet169.tv_in1k', DenseNet169, 75.600, 92.806, 'torchvision'),
  'densenet201': Weights('timm/densenet201.tv_in1k', DenseNet201, 76.896, 93.370, 'torchvision'),
  # timm's (RandAugment recipe): evaluated at 288, crop 0.95, bicubic (timm's pretrained_cfg).
  'densenet121.ra_in1k': Weights(
    'timm/densenet121.ra_in1k', DenseNet121, 76.500, 93.368, 'timm', 288, 0.95, 'bicubic'
  ),
  'densenetblur121d.ra_in1k': Weights(
    'timm/densenetblur121d.ra_in1k', DenseNetBlur121d, 77.320, 93.790, 'timm', 288, 0.95, 'bicubic'
  ),
}


class PretrainedError(RuntimeError):
  """The weights cannot be had (offline and not cached, an interrupted download, ...)."""


def repo_of(name: str) -> str:
  """The Hub repository of `name` (a key of PRETRAINED, or 'hf-hub:OWNER/REPO')."""
  if name.startswith(HUB_PREFIX):
    return name[len(HUB_PREFIX) :]
  if name not in PRETRAINED:
    raise ValueError(
      f'no pretrained weights named {name!r}: densenet_jax.pretrained knows {", ".join(PRETRAINED)}, '
      f"or 'hf-hub:OWNER/REPO' for a Hub repository with a {FILENAME} in torchvision's layout."
    )
  return PRETRAINED[name].repo_id


def download(name: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> str:
  """The local path of `name`'s weight file, fetched into the Hugging Face cache if not there yet.

  Raises:
    PretrainedError: offline (or the Hub unreachable) and not cached, or the download failed;
      nothing half-written is left where a later call would read it.
  """
  from huggingface_hub import hf_hub_download
  from huggingface_hub.errors import LocalEntryNotFoundError

  repo_id = repo_of(name)
  try:
    return hf_hub_download(repo_id, FILENAME, revision=revision, cache_dir=cache_dir)
  except LocalEntryNotFoundError as error:
    from huggingface_hub import constants

    cache = cache_dir or constants.HF_HUB_CACHE
    raise PretrainedError(
      f'{repo_id}/{FILENAME} is not in the Hugging Face cache ({cache}) and cannot be downloaded '
      f'(offline, or the Hub unreachable). On a machine online, run `hf download {repo_id} {FILENAME}` and '
      f'copy {os.path.join(cache, "models--" + repo_id.replace("/", "--"))} to the same place here; or '
      f'pass the file itself: densenet_jax.from_torchvision("{FILENAME}", model).'
    ) from error
  except Exception as error:  # noqa: BLE001  (dropped connection, no such repository, disk full, ...)
    # huggingface_hub keeps a partial file as blobs/*.incomplete, never in snapshots/: a later
    # call resumes it and nothing reads it before.
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    raise PretrainedError(
      f'downloading {repo_id}/{FILENAME} failed ({reason}); run again to resume.'
    ) from error


def pretrained(
  name: str = 'densenet121',
  *,
  num_classes: int | None = None,
  revision: str | None = None,
  cache_dir: str | os.PathLike | None = None,
  seed: int = 0,
  **model_kwargs: Any,
) -> tuple[DenseNet, dict]:
  """`(model, variables)` with pretrained weights, as `DenseNet121(weights='imagenet')` in Keras.

  Args:
    name: a key of `PRETRAINED` (torchvision's 'densenet121', 'densenet161', 'densenet169',
      'densenet201'; timm's 'densenet121.ra_in1k', 'densenetblur121d.ra_in1k'), or
      'hf-hub:OWNER/REPO' (its architecture is read off the weights).
    num_classes: None keeps the weights' classifier (1,000 ImageNet classes); another count
      replaces it by a new one
      (torch's Linear initialization, as the model's own, from `seed`), said in a log line.
    revision: a Hub branch, tag or commit.
    cache_dir: the Hugging Face cache to use (default: HF_HUB_CACHE).
    **model_kwargs: other `DenseNet` attributes (`dtype`, `memory_efficient`, `kernels`, ...).

  Returns:
    The model and `{'params', 'batch_stats'}` as numpy arrays, checked against the model.
  """
  state_dict = load_state_dict(download(name, revision=revision, cache_dir=cache_dir))
  if name.startswith(HUB_PREFIX):
    config = config_from_variables(from_torchvision(state_dict))
    weights_model = DenseNet(**config, **model_kwargs)
  else:
    weights_model = PRETRAINED[name].model(**model_kwargs)
  variables = from_torchvision(state_dict, weights_model)  # Every key and shape checked.
  if num_classes in (None, weights_model.num_classes):
    return weights_model, variables
  model = weights_model.clone(num_classes=num_classes)
  in_features = variables['params']['classifier']['kernel'].shape[0]
  classifier = nn.Dense(num_classes, kernel_init=dense_kernel_init, param_dtype=model.param_dtype)
  fresh = classifier.init(jax.random.key(seed), jnp.zeros((1, in_features), model.param_dtype))
  variables['params']['classifier'] = jax.tree.map(np.asarray, fresh['params'])
  logging.info(
    'pretrained(%r): a new classifier for %d classes (the weights have %d).',
    name,
    num_classes,
    weights_model.num_classes,
  )
  return model, variables
