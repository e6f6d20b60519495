"""Tiny random upscaler weights in real layouts, for the spandrel enhance backend (tasks/enhance_model.py)."""

from __future__ import annotations

from pathlib import Path

GROWTH = 32  # RRDBNet's growth channels: fixed in the architecture spandrel builds


def write_tiny_realesrgan(path: Path, *, features: int = 8, blocks: int = 1, seed: int = 0) -> Path:
    """A Real-ESRGAN x4plus-style RRDBNet checkpoint (basicsr's keys under "params_ema", as the release
    files are), with `features` channels and `blocks` RRDB blocks instead of 64 and 23: a 4x upscaler of
    random weights, small enough to run on CPU in milliseconds."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def conv(out: int, inp: int) -> dict:
        return {"weight": torch.randn(out, inp, 3, 3, generator=gen) * 0.05, "bias": torch.zeros(out)}

    layers = {"conv_first": conv(features, 3)}
    for b in range(blocks):
        for r in (1, 2, 3):
            for c in range(1, 6):
                inp, out = features + (c - 1) * GROWTH, GROWTH if c < 5 else features
                layers[f"body.{b}.rdb{r}.conv{c}"] = conv(out, inp)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        layers[name] = conv(features, features)
    layers["conv_last"] = conv(3, features)
    layers["conv_last"]["bias"] += 0.5  # a near mid-grey picture: plainly not the input
    state = {f"{name}.{kind}": t for name, params in layers.items() for kind, t in params.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": state}, path)
    return path


def write_random_gfpgan(path: Path, *, seed: int = 0) -> Path:
    """A GFPGAN v1.3/1.4 ("clean") checkpoint of random weights in the release layout (the state dict under
    "params_ema"): spandrel's own GFPGANv1Clean at the hyper-parameters spandrel hard-codes (512 px, narrow
    1: about 80M parameters), stored in fp16 to halve the file (~160 MB); spandrel reads it back as fp32."""
    import torch

    from tasks.enhance_model import import_spandrel

    import_spandrel()  # through the torchvision stand-in where the real one does not import
    from spandrel.architectures.GFPGAN import GFPGAN

    torch.manual_seed(seed)
    model = GFPGAN(
        out_size=512,
        num_style_feat=512,
        channel_multiplier=2,
        decoder_load_path=None,
        fix_decoder=False,
        num_mlp=8,
        input_is_latent=True,
        different_w=True,
        narrow=1,
        sft_half=True,
    )
    state = {name: t.half() for name, t in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": state}, path)
    return path


def write_tiny_restoreformer(path: Path, *, seed: int = 0) -> Path:
    """RestoreFormer weights of random values in the release key layout, narrow (32 channels at every level,
    one residual block, a 16-entry codebook): spandrel reads these sizes from the tensors, keeping what it
    cannot (512 px, attention at 16 px, 8 heads)."""
    import torch

    from tasks.enhance_model import import_spandrel

    import_spandrel()
    from spandrel.architectures.RestoreFormer import RestoreFormer

    torch.manual_seed(seed)
    model = RestoreFormer(
        n_embed=16,
        embed_dim=32,
        ch=32,
        ch_mult=(1, 1, 1, 1, 1, 1),
        num_res_blocks=1,
        z_channels=32,
        head_size=8,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": model.state_dict()}, path)
    return path
