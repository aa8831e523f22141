"""``varlen train``: packed, token-budget training on one process or many (DDP, FSDP2), built and
stepped by :mod:`varlen.engine`; the command itself is ``varlen.train.cli``."""
