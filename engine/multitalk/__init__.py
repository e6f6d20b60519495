"""MultiTalk render engine (Wan 2.1 I2V-14B + MultiTalk audio adapter), part 1: one clip.

Light on import: torch-heavy modules (diffusers, transformers) load only when a pipeline is built.
"""

from engine.multitalk.settings import EngineSettings

__all__ = ["EngineSettings"]
