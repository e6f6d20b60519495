"""A tiny random-weight Kokoro-82M in the real on-disk layout (config.json, kokoro-v1_0.pth, voices/*.pt).

The architecture is Kokoro's own (KModel builds it from config.json), made small where the config allows it
(one layer, a small PL-BERT, short phoneme durations); the decoder's widths are fixed by the kokoro package.
The weights are saved as KModel's state dicts per module, the layout of hexgrad/Kokoro-82M's .pth.
"""

from __future__ import annotations

import json
from pathlib import Path

# Every phoneme misaki's English G2P writes, plus punctuation: the vocabulary of the tiny model.
PHONEMES = (
    ';:,.!?¡¿—…"«»“” abcdefghijklmnopqrstuvwxyz'
    "ɑɐɒæɓʙβɔɕçɗɖðʤəɘɚɛɜɝɞɟʄɡɠɢʛɦɧħɥʜɨɪʝɭɬɫɮʟɱɯɰŋɳɲɴøɵɸθœɶʘɹɺɾɻʀʁɽʂʃʈʧʉʊʋⱱʌɣɤʍχʎʏʑʐʒʔʡʕʢ"
    "ˈˌːˑʼʴʰʱʲʷˠˤ˞↓↑→↗↘'̩ᵻAIOQSTWYᵊ"
)


def make_tiny_kokoro(models_dir: Path, voices: tuple[str, ...] = ("af_tiny", "am_tiny")) -> Path:
    """Write $DUBFLOW_MODELS_DIR/hexgrad/Kokoro-82M/ with random weights; returns that folder."""
    import torch
    from kokoro import KModel

    folder = models_dir / "hexgrad" / "Kokoro-82M"
    (folder / "voices").mkdir(parents=True, exist_ok=True)
    vocab = {p: i + 1 for i, p in enumerate(dict.fromkeys(PHONEMES))}
    config = {
        "vocab": vocab,
        "n_token": len(vocab) + 1,
        "hidden_dim": 512,  # the decoder's input width is fixed at 512 in kokoro.istftnet
        "style_dim": 128,  # KModel splits the voice vector at 128
        "n_layer": 1,
        "max_dur": 4,  # at most 4 frames (0.05 s) per phoneme: short audio from random weights
        "dropout": 0.0,
        "text_encoder_kernel_size": 5,
        "n_mels": 80,
        "plbert": {
            "hidden_size": 32,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 512,
            "num_hidden_layers": 1,
            "dropout": 0.0,
        },
        "istftnet": {
            "upsample_kernel_sizes": [20, 12],
            "upsample_rates": [10, 6],
            "gen_istft_hop_size": 5,
            "gen_istft_n_fft": 20,
            "resblock_dilation_sizes": [[1, 3, 5]],
            "resblock_kernel_sizes": [3],
            "upsample_initial_channel": 512,
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    empty = folder / "empty.pth"
    torch.save({}, empty)  # KModel loads whatever .pth it is given: an empty one leaves the random init
    torch.manual_seed(0)
    model = KModel(repo_id="hexgrad/Kokoro-82M", config=str(folder / "config.json"), model=str(empty))
    empty.unlink()
    modules = ("bert", "bert_encoder", "predictor", "text_encoder", "decoder")
    state = {
        name: {
            k: (v.half() if v.is_floating_point() else v)
            for k, v in getattr(model, name).state_dict().items()
        }
        for name in modules
    }  # half precision: half the bytes on disk; KModel's load_state_dict casts back to float32
    torch.save(state, folder / "kokoro-v1_0.pth")
    for i, voice in enumerate(voices):
        generator = torch.Generator().manual_seed(i + 1)
        torch.save(torch.randn(510, 1, 256, generator=generator) * 0.1, folder / "voices" / f"{voice}.pt")
    return folder
