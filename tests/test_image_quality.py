"""Our image transforms against torchvision's, pixel for pixel, on natural-looking JPEGs.

The pretrained weights were trained and evaluated with torchvision's antialiased transforms, so
the input pipeline must give the pixels those give: eval's Resize(256) + CenterCrop(224) and a
training crop (RandomResizedCrop at a fixed window), both antialiased bilinear. Both sides start
from the same decoded pixels (TensorFlow's decoder), so what is compared is the resampling, and
our decoding of only a window is compared with decoding it all. Before rounding, ours equals
torchvision's float resampling to float32 precision. Rounded, it is within the tolerance by which
torchvision's own two paths differ (its uint8 path rounds between its horizontal and vertical
passes, as PIL does; its float path does not), in 0-255 units: at most 1 anywhere, under 0.25 on
average. A resize without antialiasing (plain bilinear, or bicubic as Flax's ImageNet example)
misses it by far.
"""

import sys

import numpy as np
import pytest
from conftest import REPO, import_over_cpu_torch, optional_module

tf = optional_module('tensorflow')
torch = optional_module('torch')
sys.path.insert(0, str(REPO / 'benchmarks'))
from synthetic_imagenet import natural_image  # noqa: E402

from configs import densenet121  # noqa: E402
from densenet_jax.train import preprocess  # noqa: E402

MAX_DIFFERENCE = 1  # 0-255 units, anywhere
MEAN_DIFFERENCE = 0.25
# Before rounding: TensorFlow places the samples in float32 and torch in float64, off by up to
# 640 px x 2^-24 ~ 4e-5 px, which a 255-unit edge under the filter turns into ~0.01.
FLOAT_DIFFERENCE = 0.01
# ImageNet's shapes: landscape and portrait, odd and even sides, one smaller than the resize.
SHAPES = [(375, 500), (500, 333), (427, 640), (401, 401), (240, 319)]


def jpeg(height: int, width: int, seed: int) -> bytes:
  image = natural_image(np.random.default_rng(seed), height, width)
  return tf.io.encode_jpeg(tf.constant(image), quality=90).numpy()


def decoded(encoded: bytes):
  """The pixels both sides start from (the whole image decoded), as a torch uint8 CHW tensor."""
  return torch.from_numpy(tf.io.decode_jpeg(encoded, channels=3).numpy()).permute(2, 0, 1)


def torchvision_eval(pixels, resize: int = 256, crop: int = 224, interpolation: str = 'bilinear'):
  functional = import_over_cpu_torch('torchvision.transforms.v2.functional')
  mode = import_over_cpu_torch('torchvision.transforms').InterpolationMode(interpolation)
  image = functional.resize(pixels, resize, interpolation=mode, antialias=True)
  return functional.center_crop(image, crop).permute(1, 2, 0).numpy()


def torchvision_crop(pixels, window: tuple[int, int, int, int]) -> np.ndarray:
  functional = import_over_cpu_torch('torchvision.transforms.v2.functional')
  return functional.resized_crop(pixels, *window, [224, 224], antialias=True).permute(1, 2, 0).numpy()


def differences(ours: np.ndarray, reference: np.ndarray, size: int = 224) -> tuple[int, float]:
  assert ours.shape == reference.shape == (size, size, 3)
  difference = np.abs(ours.astype(np.int32) - reference.astype(np.int32))
  return int(difference.max()), float(difference.mean())


@pytest.mark.parametrize('shape', SHAPES, ids=[f'{h}x{w}' for h, w in SHAPES])
def test_eval_transform_gives_torchvisions_resize_and_center_crop(shape):
  encoded = jpeg(*shape, seed=shape[0])
  pixels = decoded(encoded)
  resampled = preprocess.center_crop(tf.constant(encoded), 224, 3, 0.875).numpy()
  assert np.abs(resampled - torchvision_eval(pixels.float())).max() < FLOAT_DIFFERENCE
  ours = preprocess.preprocess_eval(densenet121.get_config(), tf.constant(encoded), 3).numpy()
  assert ours.dtype == np.uint8
  largest, mean = differences(ours, torchvision_eval(pixels))
  assert largest <= MAX_DIFFERENCE and mean < MEAN_DIFFERENCE, (largest, mean)


@pytest.mark.parametrize('shape', SHAPES[:3], ids=[f'{h}x{w}' for h, w in SHAPES[:3]])
def test_bicubic_eval_as_timm_evaluates_its_weights_gives_torchvisions_pixels(shape):
  """timm's ra_in1k weights are evaluated at 288, crop 0.95 (resize 303), bicubic, antialiased."""
  encoded = jpeg(*shape, seed=shape[0])
  pixels = decoded(encoded)
  resampled = preprocess.center_crop(tf.constant(encoded), 288, 3, 0.95, 'bicubic').numpy()
  # Float32 against float64 sample positions, as above, under the cubic kernel's steeper slope.
  exact = torchvision_eval(pixels.float(), 303, 288, 'bicubic')
  assert np.abs(resampled - exact).max() < 2 * FLOAT_DIFFERENCE
  # torchvision's uint8 path clips to 0-255 between its passes, which bicubic overshoots at edges:
  # ours is no further from it than torchvision's own float path.
  reference = torchvision_eval(pixels, 303, 288, 'bicubic')
  own = differences(np.clip(np.floor(exact + 0.5), 0, 255), reference, 288)
  ours = preprocess.to_uint8(tf.constant(resampled)).numpy()
  largest, mean = differences(ours, reference, 288)
  assert largest <= own[0] and mean <= own[1] + 0.01 and mean < MEAN_DIFFERENCE, (largest, mean, own)


WINDOWS = {
  'downscale': (40, 60, 300, 280),
  'whole': (0, 0, 375, 500),
  'upscale': (100, 150, 150, 120),
  'odd': (17, 33, 201, 199),
  'corner': (175, 301, 200, 199),
}


@pytest.mark.parametrize('window', WINDOWS.values(), ids=WINDOWS.keys())
def test_train_crop_gives_torchvisions_resized_crop_for_the_same_window(window):
  encoded = jpeg(375, 500, seed=7)
  pixels = decoded(encoded)
  resampled = preprocess.resized_crop(tf.constant(encoded), tf.constant(window), 224, 3)
  assert np.abs(resampled.numpy() - torchvision_crop(pixels.float(), window)).max() < FLOAT_DIFFERENCE
  largest, mean = differences(preprocess.to_uint8(resampled).numpy(), torchvision_crop(pixels, window))
  assert largest <= MAX_DIFFERENCE and mean < MEAN_DIFFERENCE, (largest, mean)


def test_the_tolerance_is_what_torchvisions_own_uint8_and_float_paths_differ_by():
  pixels = decoded(jpeg(375, 500, seed=7))
  for window in WINDOWS.values():
    exact = np.floor(torchvision_crop(pixels.float(), window) + 0.5)
    largest, mean = differences(exact, torchvision_crop(pixels, window))
    assert largest <= MAX_DIFFERENCE and mean < MEAN_DIFFERENCE, (largest, mean)


@pytest.mark.parametrize('method', ['bilinear', 'bicubic'])
def test_a_resize_without_antialiasing_fails_the_tolerance(method):
  """The tolerance tells antialiasing apart: Flax's bicubic and plain bilinear miss it."""
  encoded = jpeg(375, 500, seed=7)
  window = WINDOWS['downscale']
  crop = tf.io.decode_and_crop_jpeg(tf.constant(encoded), window, channels=3)
  aliased = preprocess.to_uint8(tf.image.resize(crop, [224, 224], method=method, antialias=False)).numpy()
  largest, mean = differences(aliased, torchvision_crop(decoded(encoded), window))
  assert largest > 10 * MAX_DIFFERENCE and mean > 4 * MEAN_DIFFERENCE, (largest, mean)
