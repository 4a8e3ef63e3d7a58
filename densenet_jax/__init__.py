"""densenet-jax: DenseNet in JAX/Flax, numerically faithful to torchvision."""

from densenet_jax import nnx as nnx  # The NNX modules: densenet_jax.nnx.DenseNet121(rngs=...).
from densenet_jax.models import DenseBlock as DenseBlock
from densenet_jax.models import DenseLayer as DenseLayer
from densenet_jax.models import DenseNet as DenseNet
from densenet_jax.models import DenseNet121 as DenseNet121
from densenet_jax.models import DenseNet161 as DenseNet161
from densenet_jax.models import DenseNet169 as DenseNet169
from densenet_jax.models import DenseNet201 as DenseNet201
from densenet_jax.models import DenseNet264 as DenseNet264
from densenet_jax.models import DenseNet264d as DenseNet264d
from densenet_jax.models import DenseNetBlur121d as DenseNetBlur121d
from densenet_jax.models import Transition as Transition
from densenet_jax.models import densenet_cifar as densenet_cifar
from densenet_jax.ops import KERNEL_SETS as KERNEL_SETS
from densenet_jax.ops import KernelSet as KernelSet
from densenet_jax.ops import kernel_set as kernel_set
from densenet_jax.torchvision_port import StateDictError as StateDictError
from densenet_jax.torchvision_port import config_from_variables as config_from_variables
from densenet_jax.torchvision_port import from_torchvision as from_torchvision
from densenet_jax.torchvision_port import to_torchvision as to_torchvision
from densenet_jax.weights import PRETRAINED as PRETRAINED
from densenet_jax.weights import PretrainedError as PretrainedError
from densenet_jax.weights import pretrained as pretrained

__version__ = '0.1.0'
