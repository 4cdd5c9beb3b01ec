"""The speech path's frozen forward (Whisper encoder + the speech aligner's Whisper decoder) as transformers
writes it against the same modules as the model builds them, one process, the same weights.

The model stores the encoder's hidden states token-major (``store_states_token_major``) and gives the encoder's
and the aligner decoder's attention layers ``TokenMajorWhisperAttention`` (``attend_without_copies``): no copies
of q, k, v and the attention output. This script times both forwards (bf16, no grad, synchronised around each
forward; the best of three alternating medians of ``--reps``) at the launcher's shapes (Whisper-small, 30 s
windows, 32 queries), prints both, their ratio and the largest difference between their outputs, relative to the
outputs' largest magnitude.

    python benchmarks/speech_encoder.py --out FILE     # CUDA, Whisper-small, batch 8
    python benchmarks/speech_encoder.py --smoke        # a tiny Whisper on the CPU, float32
"""

from __future__ import annotations

import argparse
import copy
import datetime
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperDecoder, WhisperEncoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation import median_ms  # noqa: E402
from report import device_name, emit_table, relative_difference  # noqa: E402

from Uni_MoE.model.encoders.whisper import attend_without_copies, store_states_token_major  # noqa: E402

QUERIES = 32


@dataclass
class Shapes:
    config: WhisperConfig
    batch: int
    dtype: torch.dtype


def whisper_small() -> WhisperConfig:
    return WhisperConfig(d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
                         decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, num_mel_bins=80,
                         max_source_positions=1500, attn_implementation="sdpa")


def tiny() -> WhisperConfig:
    return WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                         max_source_positions=50, max_target_positions=QUERIES, attn_implementation="sdpa")


class SpeechPath(nn.Module):
    """Whisper encoder, then the Whisper decoder reading ``QUERIES`` query embeddings against its states."""

    def __init__(self, config: WhisperConfig) -> None:
        super().__init__()
        self.encoder = WhisperEncoder(config)
        self.decoder = WhisperDecoder(config)
        self.decoder.embed_tokens = None  # the queries arrive as embeddings, as in SpeechAligner
        self.queries = nn.Parameter(torch.randn(1, QUERIES, config.d_model) * 0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        states = self.encoder(features).last_hidden_state
        queries = self.queries.expand(features.shape[0], -1, -1)
        return self.decoder(inputs_embeds=queries, encoder_hidden_states=states, use_cache=False).last_hidden_state


def as_the_model_builds_it(path: SpeechPath) -> SpeechPath:
    """A copy of ``path`` with the model's token-major encoder states and copy-free attention."""
    ours = copy.deepcopy(path)
    store_states_token_major(ours.encoder)
    attend_without_copies(ours.decoder)
    return ours


def run(shapes: Shapes, device: torch.device, reps: int) -> dict[str, float]:
    torch.manual_seed(0)
    c = shapes.config
    baseline = SpeechPath(c).to(device=device, dtype=shapes.dtype).eval()
    ours = as_the_model_builds_it(baseline)
    frames = 2 * c.max_source_positions  # one 30 s window for Whisper-small: 3000 mel frames
    features = torch.randn(shapes.batch, c.num_mel_bins, frames, device=device, dtype=shapes.dtype)
    with torch.no_grad():
        reference, result = baseline(features).float(), ours(features).float()
        difference = relative_difference(reference, result)
        baseline(features), ours(features)  # warm-up
        results = {"transformers": [], "ours": []}
        for _ in range(3):  # alternate, so a drift of the clock weighs on both
            results["transformers"].append(median_ms(lambda: baseline(features), device, reps))
            results["ours"].append(median_ms(lambda: ours(features), device, reps))
    base_ms, ours_ms = (min(results[k]) for k in ("transformers", "ours"))
    return {"transformers_ms": base_ms, "ours_ms": ours_ms, "ratio": ours_ms / base_ms, "difference": difference,
            "frames": frames}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="a tiny Whisper on the CPU, float32")
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    if args.smoke:
        args.device, args.reps, args.batch = "cpu", 2, 2
    shapes = Shapes(tiny() if args.smoke else whisper_small(), args.batch,
                    torch.float32 if args.smoke else torch.bfloat16)
    device = torch.device(args.device)
    r = run(shapes, device, args.reps)
    name = device_name(device)
    c = shapes.config
    text = "\n".join([
        "# Speech path forward: transformers' Whisper attention and layout against the model's",
        "",
        f"- device: {name}; torch {torch.__version__}; date {datetime.date.today().isoformat()}",
        f"- shapes: batch {shapes.batch}, {r['frames']} mel frames, d_model {c.d_model}, {c.encoder_layers} encoder "
        f"and {c.decoder_layers} decoder layers, {QUERIES} queries, {str(shapes.dtype).removeprefix('torch.')}, "
        "no grad; the best of three alternating medians of "
        f"{args.reps} forwards each",
        "",
        "| transformers ms | ours ms | ours / transformers | max difference / max output |",
        "|---|---|---|---|",
        f"| {r['transformers_ms']:.2f} | {r['ours_ms']:.2f} | **{r['ratio']:.3f}** | {r['difference']:.1e} |",
        "",
    ])
    emit_table(text, args.out)


if __name__ == "__main__":
    main()
