"""Models: the study's reference decoder, and the model families bench, train and check build."""

from .decoder import PRESETS, Decoder, DecoderConfig, forward_batch, lm_loss
from .families import DECODER, FAMILIES, HF_GPT2, HF_LLAMA, ModelFamily, family

__all__ = ["DECODER", "FAMILIES", "HF_GPT2", "HF_LLAMA", "PRESETS", "Decoder", "DecoderConfig", "ModelFamily", "family",
           "forward_batch", "lm_loss"]
