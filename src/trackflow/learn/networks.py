"""Networks as plain ``nn.Module``s, built from params by a factory and injected into Lightning.

A classifier is a *backbone* (features -> embedding, the part transferred between tasks) followed by
a *head* (embedding -> class logits, always new for a task). Every backbone exposes
``in_features`` and ``out_features`` so heads and checks need nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trackflow.config import ModelConfig
from trackflow.errors import ConfigError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}


def _norm_1d(kind: str, width: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    if kind == "group":
        return nn.GroupNorm(_groups(width), width)
    return nn.Identity()


def _norm_2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":  # layer norm over (C, H, W) of each image, as GroupNorm with one group
        return nn.GroupNorm(1, channels)
    if kind == "group":
        return nn.GroupNorm(_groups(channels), channels)
    return nn.Identity()


def _groups(width: int) -> int:
    """Largest divisor of ``width`` up to 8: the number of groups in group normalization."""
    return max(g for g in range(1, 9) if width % g == 0)


class MLPBackbone(nn.Module):
    """Fully connected layers over feature vectors: (batch, in_features) -> (batch, out)."""

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        norm: str = "batch",
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width_in = in_features
        for width in widths:
            layers += [
                nn.Linear(width_in, width),
                _norm_1d(norm, width),
                ACTIVATIONS[activation](),
                nn.Dropout(dropout),
            ]
            width_in = width
        self.layers = nn.Sequential(*layers)
        self.in_features = in_features
        self.out_features = width_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch of feature vectors."""
        return self.layers(x)


class SeparableBlock(nn.Module):
    """MobileNet-style block: depthwise 3x3 then pointwise 1x1 conv, each normalized, activated."""

    def __init__(self, channels_in: int, channels_out: int, norm: str, activation: str) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels_in, channels_in, 3, padding=1, groups=channels_in)
        self.norm_dw = _norm_2d(norm, channels_in)
        self.pointwise = nn.Conv2d(channels_in, channels_out, 1)
        self.norm_pw = _norm_2d(norm, channels_out)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, C_in, H, W) -> (batch, C_out, H, W)."""
        x = self.act(self.norm_dw(self.depthwise(x)))
        return self.act(self.norm_pw(self.pointwise(x)))


class ConvBackbone(nn.Module):
    """Depthwise-separable CNN over image-shaped rows.

    Input (batch, C*H*W) is reshaped to (batch, C, H, W); a stem conv is followed by one separable
    block per entry of ``channels`` (2x downsampling between blocks), then average pooling to a 2x2
    grid. Output: (batch, 4 * channels[-1]).
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        channels: Sequence[int],
        norm: str = "batch",
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        c_in = self.image_shape[0]
        stem = channels[0]
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, stem, 3, padding=1),
            _norm_2d(norm, stem),
            ACTIVATIONS[activation](),
        ]
        for i, (a, b) in enumerate(zip([stem, *channels[:-1]], channels, strict=True)):
            if i > 0:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            layers.append(SeparableBlock(a, b, norm, activation))
        # Pool to 2x2, not to 1x1: on images this small, where a stroke is matters.
        layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(dropout)]
        self.layers = nn.Sequential(*layers)
        self.in_features = math.prod(self.image_shape)
        self.out_features = 4 * channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch of flattened images."""
        return self.layers(x.reshape(-1, *self.image_shape))


def build_backbone(config: ModelConfig, in_features: int) -> nn.Module:
    """The backbone named by ``config.backbone`` for inputs of ``in_features`` columns.

    Raises:
        ConfigError: The CNN is asked for while the features are not image-shaped.
    """
    if config.backbone == "mlp":
        return MLPBackbone(
            in_features, config.widths, config.norm, config.activation, config.dropout
        )
    shape = config.image_shape or _square_image(in_features)
    if math.prod(shape) != in_features:
        raise ConfigError(
            f"model.backbone=cnn needs image-shaped features, but {in_features} features do not "
            f"make an image of shape {list(shape)}. Turn PCA off (preprocess.pca.n_components: "
            "null) or set model.image_shape"
        )
    return ConvBackbone(shape, config.channels, config.norm, config.activation, config.dropout)


def build_head(in_features: int, n_classes: int) -> nn.Module:
    """A new linear classification head: (batch, in_features) -> (batch, n_classes) logits."""
    return nn.Linear(in_features, n_classes)


def init_weights(module: nn.Module, scheme: str, seed: int | None = None) -> None:
    """Re-initialize the weights of every linear and conv layer in ``module`` in place.

    ``default`` keeps PyTorch's own initialization; biases are zeroed by the other schemes.
    """
    if scheme == "default":
        return
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    for layer in module.modules():
        if not isinstance(layer, nn.Linear | nn.Conv2d):
            continue
        weight = layer.weight
        with torch.no_grad():
            if scheme == "xavier":
                nn.init.xavier_uniform_(weight, generator=generator)
            elif scheme == "he":
                nn.init.kaiming_normal_(weight, nonlinearity="relu", generator=generator)
            else:  # "normal"
                nn.init.normal_(weight, std=0.02, generator=generator)
            if layer.bias is not None:
                layer.bias.zero_()


def count_parameters(module: nn.Module) -> dict[str, int]:
    """Trainable and frozen parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen}


def _square_image(in_features: int) -> tuple[int, int, int]:
    side = math.isqrt(in_features)
    if side * side != in_features:
        raise ConfigError(
            f"model.backbone=cnn: {in_features} features are not a square image; turn PCA off "
            "(preprocess.pca.n_components: null) or set model.image_shape: [channels, height, "
            "width]"
        )
    return (1, side, side)


NETWORK_FORMAT = 1
ENSEMBLE_FORMAT = 2  # several members (format-1 weights each) and how they vote


def save_network(
    path: str | Path,
    backbone: nn.Module | None,
    model_config: ModelConfig,
    in_features: int,
    head: nn.Module | None = None,
    **meta: Any,
) -> None:
    """Save weights with what rebuilding them needs (architecture, input width, ``meta``).

    ``backbone=None`` records that no backbone was produced; ``meta["reason"]`` says why.
    """
    torch.save(
        {
            "format": NETWORK_FORMAT,
            "model": model_config.model_dump(mode="json"),
            "in_features": in_features,
            "backbone": None if backbone is None else backbone.state_dict(),
            "head": None if head is None else head.state_dict(),
            **meta,
        },
        path,
    )


def save_ensemble(
    path: str | Path,
    members: Sequence[tuple[nn.Module, nn.Module]],
    vote: str,
    model_configs: Sequence[ModelConfig],
    in_features: int,
    **meta: Any,
) -> None:
    """Save each member's ``(backbone, head)`` and architecture, the vote, and ``meta``.

    ``meta`` holds what :func:`save_network` keeps beside one network (``classes``, ...).
    """
    torch.save(
        {
            "format": ENSEMBLE_FORMAT,
            "vote": vote,
            "members": [
                {
                    "model": config.model_dump(mode="json"),
                    "in_features": in_features,
                    "backbone": backbone.state_dict(),
                    "head": head.state_dict(),
                }
                for (backbone, head), config in zip(members, model_configs, strict=True)
            ],
            **meta,
        },
        path,
    )


def load_network(path: str | Path) -> dict[str, Any]:
    """The saved dictionary of :func:`save_network` (weights only: nothing is unpickled)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_backbone(saved: dict[str, Any], in_features: int, origin: str) -> nn.Module:
    """Rebuild a saved backbone for features of width ``in_features``.

    Raises:
        ConfigError: Nothing was saved, or the backbone expects another input width.
    """
    if saved.get("format") == ENSEMBLE_FORMAT:
        raise ConfigError(
            f"{origin} holds an ensemble of {len(saved['members'])} networks, not one backbone; "
            "choose one network's file or registered version as the backbone"
        )
    if saved["backbone"] is None:
        raise ConfigError(
            f"{origin} holds no backbone ({saved.get('reason', 'none was trained')}); use "
            "train.mode: scratch, or set train.backbone to a registered backbone"
        )
    if saved["in_features"] != in_features:
        raise ConfigError(
            f"the backbone from {origin} takes {saved['in_features']} features but the "
            f"preprocessed data has {in_features}; pretrain it on the same preprocessing "
            "(preprocess.*) or choose a matching backbone"
        )
    backbone = build_backbone(ModelConfig(**saved["model"]), in_features)
    backbone.load_state_dict(saved["backbone"])
    return backbone


def load_classifier(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A saved target model as ``nn.Sequential(backbone, head)`` in eval mode, and its metadata.

    An ensemble loads as ``nn.Sequential(EnsembleBackbone, VotingHead)``: the same interface
    (``[0]`` embeds, ``[1]`` maps the embedding to logits whose softmax is the voted probability).
    """
    saved = load_network(path)
    if saved.get("format") == ENSEMBLE_FORMAT:
        parts = [_member(member, saved["classes"], str(path)) for member in saved["members"]]
        meta = {k: v for k, v in saved.items() if k != "members"}
        return voting_network(parts, saved["vote"]).eval(), meta
    backbone, head = _member(saved, saved["classes"], str(path))
    meta = {k: v for k, v in saved.items() if k not in ("backbone", "head")}
    return nn.Sequential(backbone, head).eval(), meta


def _member(saved: dict[str, Any], classes: Sequence[Any], origin: str) -> tuple[nn.Module, ...]:
    backbone = load_backbone(saved, saved["in_features"], origin)
    head = build_head(backbone.out_features, len(classes))
    head.load_state_dict(saved["head"])
    return backbone, head


class EnsembleBackbone(nn.Module):
    """The members' backbones side by side: (batch, in_features) -> (batch, sum of widths).

    The embedding of an ensemble is its members' embeddings, concatenated in member order.
    """

    def __init__(self, backbones: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(backbones)
        self.widths = [b.out_features for b in backbones]
        self.in_features = backbones[0].in_features
        self.out_features = sum(self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a batch with every member; concatenate."""
        return torch.cat([backbone(x) for backbone in self.members], dim=1)


class VotingHead(nn.Module):
    """The members' heads, each on its part of the embedding, combined by a vote.

    Output, shape (batch, n_classes): the log of the voted probabilities, so softmax gives them
    back. ``soft``: the mean of the members' softmax; ``hard``: the share of members voting for each
    class, a tie broken by the mean probability (which moves a share by at most ``TIE_BREAK``).
    """

    TIE_BREAK = 1e-4

    def __init__(self, heads: Sequence[nn.Module], widths: Sequence[int], vote: str) -> None:
        super().__init__()
        if vote not in ("soft", "hard"):
            raise ValueError(f"vote must be 'soft' or 'hard', got {vote!r}")
        self.members = nn.ModuleList(heads)
        self.widths, self.vote = list(widths), vote

    def member_proba(self, embedding: torch.Tensor) -> torch.Tensor:
        """Each member's probabilities, shape (n_members, batch, n_classes)."""
        parts = torch.split(embedding, self.widths, dim=1)
        logits = [head(part) for head, part in zip(self.members, parts, strict=True)]
        return torch.softmax(torch.stack(logits), dim=2)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Log of the voted probabilities (``-87``, not ``-inf``, for a class with none)."""
        members = self.member_proba(embedding)
        proba = members.mean(dim=0)
        if self.vote == "hard":
            n_classes = members.shape[2]
            votes = nn.functional.one_hot(members.argmax(dim=2), n_classes).to(proba.dtype)
            proba = (votes.mean(dim=0) + self.TIE_BREAK * proba) / (1 + self.TIE_BREAK)
        return torch.log(proba.clamp_min(torch.finfo(proba.dtype).tiny))


def voting_network(members: Sequence[Sequence[nn.Module]], vote: str) -> nn.Sequential:
    """``nn.Sequential(EnsembleBackbone, VotingHead)`` of ``(backbone, head)`` pairs."""
    backbone = EnsembleBackbone([b for b, _ in members])
    return nn.Sequential(backbone, VotingHead([h for _, h in members], backbone.widths, vote))


def member_count(network: nn.Module) -> int:
    """Networks voting in a :func:`load_classifier` model (1: a single network)."""
    return len(network[1].members) if isinstance(network[1], VotingHead) else 1


@torch.no_grad()
def predict_proba(network: nn.Module, features: Any) -> Any:
    """Class probabilities, shape (n_rows, n_classes), of a :func:`load_classifier` model."""
    x = torch.tensor(np.asarray(features), dtype=torch.float32)
    return torch.softmax(network.eval()(x), dim=1).numpy()


@torch.no_grad()
def member_probas(network: nn.Module, features: Any) -> Any:
    """Each member's class probabilities, shape (n_members, n_rows, n_classes).

    A single network is an ensemble of one: its :func:`predict_proba` as the one member.
    """
    if not isinstance(network[1], VotingHead):
        return predict_proba(network, features)[None]
    x = torch.tensor(np.asarray(features), dtype=torch.float32)
    return network[1].member_proba(network.eval()[0](x)).numpy()


@torch.no_grad()
def embed(network: nn.Module, features: Any) -> Any:
    """Backbone embedding, shape (n_rows, out_features), of a :func:`load_classifier` model.

    An ensemble's is its members' embeddings side by side (``out_features`` is their sum).
    """
    x = torch.tensor(np.asarray(features), dtype=torch.float32)
    return network.eval()[0](x).numpy()
