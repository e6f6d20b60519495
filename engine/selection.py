"""Which render engine `auto` means on this machine. Its own module, imported by the flow and `doctor`
only: the check loads the real engine's code, which must not become part of every render's cache key.
"""

from __future__ import annotations


def resolve_render_engine(requested: str, models_dir) -> tuple[str, str]:
    """`auto` -> multitalk when a CUDA GPU and its weights are present, else the preview renderer."""
    if requested != "auto":
        return requested, "chosen in the manifest"
    try:
        from engine.multitalk.renderer import available
    except ImportError:
        return "preview", "the multitalk engine is not installed"
    ok, reason = available(models_dir)
    return ("multitalk", reason) if ok else ("preview", f"multitalk unavailable: {reason}")
