"""Every model nmsparse trains, prunes, compiles or benchmarks, as plain torch.nn, and how to rebuild one.

``MODELS`` maps a name to its builder (``build_model``); ``build_for_data`` fills in classes and input
shape. ``save_checkpoint``/``load_checkpoint``/``load_model`` read and write checkpoints that rebuild
their model from a recorded name and sample shape. ``evaluate`` measures a classifier, or a language model
(loss per token, perplexity), on a loader.
"""

from .checkpoint import (build_from_record, load_checkpoint, load_model, model_record, record_from_config,
                         save_checkpoint)
from .evaluate import HEADLINES, autocast_dtype, evaluate, headline
from .gpt import GPT
from .mlp_block import MLPBlock
from .registry import MODELS, build_for_data, build_model, model_argument_error
from .resnet import RegNet, ResNet, ResNet9, regnetx_400mf, resnet18, resnet50
from .small import MLP, SmallCNN
from .vgg import VGG16, vgg16
from .vit import ViT, vit_tiny

__all__ = ["MODELS", "build_model", "build_for_data", "model_argument_error", "save_checkpoint", "load_checkpoint",
           "load_model", "model_record", "record_from_config", "build_from_record", "evaluate", "autocast_dtype", "headline", "HEADLINES",
           "MLP", "SmallCNN", "ResNet", "ResNet9", "RegNet", "resnet18", "resnet50", "regnetx_400mf", "ViT",
           "vit_tiny", "VGG16", "vgg16", "MLPBlock", "GPT"]
