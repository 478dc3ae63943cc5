"""Models: MLP, VGG-11-BN, ResNet-20×w, the two head forms, and the source-classifier LightningModule."""

from lightning_merge.models.classifier import SourceClassifier
from lightning_merge.models.heads import (
    ClassEmbedding,
    EmbeddingHead,
    LinearHead,
    joint_predict,
    make_head,
    orthonormal_embeddings,
    scatter_to_global,
)
from lightning_merge.models.mlp import MLP
from lightning_merge.models.plateau import PlateauRule, PlateauStopping
from lightning_merge.models.registry import ARCHITECTURES, build_model
from lightning_merge.models.resnet import BasicBlock, ResNet20
from lightning_merge.models.training import (
    load_source,
    quick_pair,
    source_record,
    task_accuracy,
    train_source,
)
from lightning_merge.models.vgg import VGG11BN

__all__ = [
    "ARCHITECTURES",
    "MLP",
    "VGG11BN",
    "BasicBlock",
    "ClassEmbedding",
    "EmbeddingHead",
    "LinearHead",
    "PlateauRule",
    "PlateauStopping",
    "ResNet20",
    "SourceClassifier",
    "build_model",
    "joint_predict",
    "load_source",
    "make_head",
    "orthonormal_embeddings",
    "quick_pair",
    "scatter_to_global",
    "source_record",
    "task_accuracy",
    "train_source",
]
