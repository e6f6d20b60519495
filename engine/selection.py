"""Which render engine `auto` means on this machine. Its own module, imported by the flow and `doctor`
only: the check loads the real engine's code, which must not become part of every render's cache key.
"""

from __future__ import annotations


def resolve_render_engine(requested: str, models_dir, source_kind: str) -> tuple[str, str]:
    """`auto` -> with a CUDA GPU: `infinitetalk` for a video source (V2V dubbing), `multitalk` for a still,
    each when its weights are present; otherwise the preview renderer. `source_kind`: "image" | "video"."""
    if requested != "auto":
        return requested, "chosen in the manifest"
    try:
        import torch

        from engine.multitalk.weights import engine_ready
    except ImportError:
        return "preview", "the multitalk engine is not installed"
    wanted = "infinitetalk" if source_kind == "video" else "multitalk"
    ok, reason = engine_ready(wanted, models_dir)
    if not torch.cuda.is_available():
        return "preview", f"{wanted} needs a CUDA device (a GPU with >= 48 GB); {reason}"
    return (wanted, f"{source_kind} source, CUDA device and {reason}") if ok else ("preview", reason)
