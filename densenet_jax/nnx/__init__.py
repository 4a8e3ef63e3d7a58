"""DenseNet as Flax NNX modules: `model(images)`, `model.train()` / `model.eval()`, torchvision's names.

  >>> from flax import nnx
  >>> model = densenet_jax.nnx.DenseNet121(num_classes=10, rngs=nnx.Rngs(0))
  >>> logits = model(images)  # training mode, as nnx.BatchNorm: batch statistics, running averages move
  >>> model.eval()  # running averages, no dropout; model.train() switches back
  >>> model.features.denseblock1.denselayer1.conv1.kernel.shape
  (1, 1, 64, 128)

The weights sit where torchvision keeps them (`features.conv0`, `features.denseblock1.denselayer1.norm1`,
`features.transition1.conv`, `features.norm5`, `classifier`), each in the stock NNX layer a torch user
would expect there (`nnx.Conv`, `nnx.BatchNorm`, `nnx.Linear`, configured as the network uses it), so
`nnx.state(model, nnx.BatchStat)`, `nnx.Optimizer(model, tx, wrt=nnx.Param)` and surgery such as
`model.classifier = nnx.Linear(1024, 10, rngs=rngs)` work as for any NNX model.

The network runs as a whole: `DenseNet.__call__` applies the Linen `densenet_jax.models.DenseNet` of the
same configuration to these variables. There is one implementation of the arithmetic, and with it the
kernel sets, `memory_efficient`, `axis_name` and the one-line input errors; NNX and Linen give the same
numbers bit for bit (tests/test_nnx.py). `from_linen` / `to_linen` move a model between the two APIs.
"""

from densenet_jax.nnx.models import DenseNet as DenseNet
from densenet_jax.nnx.models import DenseNet121 as DenseNet121
from densenet_jax.nnx.models import DenseNet161 as DenseNet161
from densenet_jax.nnx.models import DenseNet169 as DenseNet169
from densenet_jax.nnx.models import DenseNet201 as DenseNet201
from densenet_jax.nnx.models import DenseNet264 as DenseNet264
from densenet_jax.nnx.models import DenseNet264d as DenseNet264d
from densenet_jax.nnx.models import DenseNetBlur121d as DenseNetBlur121d
from densenet_jax.nnx.models import densenet_cifar as densenet_cifar
from densenet_jax.nnx.models import to_linen as to_linen
from densenet_jax.nnx.models import to_linen_tree as to_linen_tree
from densenet_jax.nnx.weights import from_linen as from_linen
from densenet_jax.nnx.weights import from_torchvision as from_torchvision
from densenet_jax.nnx.weights import load_linen_variables as load_linen_variables
from densenet_jax.nnx.weights import pretrained as pretrained
from densenet_jax.nnx.weights import to_torchvision as to_torchvision
