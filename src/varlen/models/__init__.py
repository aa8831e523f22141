"""Models: the study's reference decoder."""

from .decoder import PRESETS, Decoder, DecoderConfig, forward_batch, lm_loss

__all__ = ["PRESETS", "Decoder", "DecoderConfig", "forward_batch", "lm_loss"]
