"""The networks, from MONAI, and the heads that turn their logits into the manifest's outputs.

Only model building, import and export use this module; serving never imports torch.
The activations live inside the exported graph, so every ONNX file gives probabilities
and the pipeline does not have to know which activation a model needs.
"""

from __future__ import annotations

import torch
from monai.networks.nets.densenet import DenseNet121
from monai.networks.nets.efficientnet import EfficientNetBN
from torch import nn

from models.runtime import reference_sample
from models.zoo import Task

EFFICIENTNETS = ("efficientnet-b0", "efficientnet-b3")


def backbone(task: Task, variant: str | None = None) -> nn.Module:
    """The bare network of a task, logits out; ``variant`` picks the EfficientNet size."""
    if task.task == "chest-xray":
        return DenseNet121(spatial_dims=2, in_channels=1, out_channels=len(task.outputs[0].labels))
    name = variant or task.options.get("variant", "efficientnet-b0")
    if name not in EFFICIENTNETS:
        raise ValueError(
            f"unknown EfficientNet variant {name!r}; one of {', '.join(EFFICIENTNETS)}"
        )
    channels = 3 if task.preprocessing.color == "rgb" else 1
    if task.task == "fundus":
        classes = len(task.outputs[0].labels)
    elif task.task == "glaucoma":
        classes = 2  # the cup-to-disc ratio's logit and referable glaucoma's
    else:
        classes = 1 + len(task.outputs[1].labels)  # malignancy logit + density logits
    return EfficientNetBN(
        name, pretrained=False, spatial_dims=2, in_channels=channels, num_classes=classes
    )


class Screening(nn.Module):
    """Backbone plus the task's head: the module that is exported."""

    def __init__(self, task: Task, network: nn.Module) -> None:
        super().__init__()
        self.task = task.task
        self.network = network

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.task == "chest-xray":
            return self._with_activation_maps(image)
        if self.task == "fundus":
            grades = torch.softmax(self.network(image), dim=1)
            referable = grades[:, 2:].sum(dim=1, keepdim=True)  # ICDR grade >= 2
            return grades, referable
        if self.task == "glaucoma":
            logits = self.network(image)
            return torch.sigmoid(logits[:, :1]), torch.sigmoid(logits[:, 1:2])
        features = _efficientnet_features(self.network, image)
        classifier = self.network.get_submodule("_fc")
        assert isinstance(classifier, nn.Linear)
        # Average pooling, then the classifier (dropout is the identity when exported).
        logits = classifier(features.mean(dim=(2, 3)))
        malignancy = torch.sigmoid(logits[:, :1])
        density = torch.softmax(logits[:, 1:], dim=1)
        # Where the malignancy logit's evidence lies: its classifier row at each cell.
        maps = torch.einsum("bkhw,ck->bchw", features, classifier.weight[:1])
        maps = maps + classifier.bias[None, :1, None, None]
        return malignancy, density, torch.sigmoid(maps)

    def _with_activation_maps(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """DenseNet's logits, and the class activation maps they average (Zhou et al.
        2016): the classifier applied at each cell of the last feature map."""
        layers = self.network.get_submodule("class_layers")
        features = layers.get_submodule("relu")(self.network.get_submodule("features")(image))
        classifier = layers.get_submodule("out")
        assert isinstance(classifier, nn.Linear)
        logits = classifier(features.mean(dim=(2, 3)))
        maps = torch.einsum("bkhw,ck->bchw", features, classifier.weight)
        maps = maps + classifier.bias[None, :, None, None]
        return torch.sigmoid(logits), torch.sigmoid(maps)


def _efficientnet_features(network: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """MONAI's EfficientNet up to its pooling: the last feature map (stride 32), the
    steps of ``EfficientNet.forward`` before ``_avg_pooling``."""
    x = network.get_submodule("_conv_stem")(network.get_submodule("_conv_stem_padding")(image))
    x = network.get_submodule("_swish")(network.get_submodule("_bn0")(x))
    x = network.get_submodule("_blocks")(x)
    x = network.get_submodule("_conv_head")(network.get_submodule("_conv_head_padding")(x))
    features: torch.Tensor = network.get_submodule("_swish")(network.get_submodule("_bn1")(x))
    return features


def demo_weights(module: nn.Module, task: Task, seed: int) -> None:
    """Seeded weights whose outputs are not degenerate.

    Freshly initialised deep networks squash their activations towards zero, so every
    image would get the same scores. Re-estimating the batch-norm statistics on noise
    in the input's intensity range and on image-like inputs (black, white, a gradient,
    noise beside black; a few forward passes in training mode, no gradient) keeps
    activations at unit scale for the inputs the model will see: estimated on noise
    alone, a mammogram's black half gives activations so large that ONNX Runtime and
    torch, each exact to float32, differ in the third decimal.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(layer.weight, generator=generator)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the passes below
    module.train()
    samples = [
        torch.from_numpy(reference_sample(task.input, task.preprocessing, seed=seed * 10 + n))
        for n in range(3)
    ]
    with torch.no_grad():
        for sample in samples:
            module(torch.cat([sample, _shapes(sample)]))
    module.eval()
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    _screening_head(module, task, seed, samples)


# How far (in logits) the demo head's outputs may move from the aim over the inputs it
# is calibrated on: enough that images differ, small enough that the calls stay those
# aimed at below.
_HEAD_SPREAD = 1.5


def _shapes(sample: torch.Tensor) -> torch.Tensor:
    """Inputs with the structure of images rather than noise: black, white, a gradient,
    and noise beside black (an organ against air), each in the input's own range."""
    low, high = sample.amin(), sample.amax()
    black, white = torch.full_like(sample[:1], 0) + low, torch.full_like(sample[:1], 0) + high
    rows = torch.linspace(0, 1, sample.shape[2], dtype=sample.dtype)[None, None, :, None]
    gradient = low + (high - low) * rows.expand_as(sample[:1])
    half = sample[:1].clone()
    half[..., sample.shape[3] // 2 :] = low
    return torch.cat([black, white, gradient, half])


def _screening_head(module: nn.Module, task: Task, seed: int, samples: list[torch.Tensor]) -> None:
    """Demo outputs that read like a screening population: the classifier's bias set so
    that, on the inputs above, most findings sit well below their operating point and a
    seeded few above it (chest X-ray), the fundus grades fall off from "no apparent
    retinopathy", the cup-to-disc ratio is that of a healthy disc and referable glaucoma
    rare, malignancy is low and density mostly B. Seeded weights otherwise call
    nearly every finding positive, and a viewer then draws all of them."""
    head = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    network = module.network if isinstance(module, Screening) else module
    with torch.no_grad():
        head.bias.zero_()
        every = torch.cat([network(torch.cat([s, _shapes(s)])) for s in samples]).double()
        logits = every.mean(dim=0)
        spread = float((every - logits).abs().max())
        if spread > _HEAD_SPREAD:
            head.weight.mul_(_HEAD_SPREAD / spread)
            logits = logits * (_HEAD_SPREAD / spread)
        rng = torch.Generator().manual_seed(seed)
        if task.task == "chest-xray":
            labels = logits.shape[0]
            target = 0.02 + 0.2 * torch.rand(labels, generator=rng, dtype=torch.float64)
            positive = torch.randperm(labels, generator=rng)[:2]
            target[positive] = 0.7 + 0.2 * torch.rand(2, generator=rng, dtype=torch.float64)
            aim = torch.logit(target)
        elif task.task == "fundus":
            aim = torch.log(torch.tensor([0.6, 0.22, 0.1, 0.05, 0.03], dtype=torch.float64))
        elif task.task == "glaucoma":
            # A cup-to-disc ratio of about 0.35 (a healthy disc), referable glaucoma rare.
            aim = torch.logit(torch.tensor([0.35, 0.08], dtype=torch.float64))
        else:
            density = torch.log(torch.tensor([0.2, 0.45, 0.25, 0.1], dtype=torch.float64))
            malignancy = torch.logit(torch.tensor([0.08], dtype=torch.float64))
            aim = torch.cat([malignancy, density])
        head.bias.copy_((aim - logits).to(head.bias.dtype))
