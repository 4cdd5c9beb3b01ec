"""On the GPU: the fused attention (Triton rotary) and the fused LoRA linear against transformers and PEFT.

A LLaMA model with PEFT LoRA on the attention projections runs forward and backward on one batch, as
transformers and PEFT build it and with ``fuse_attention`` + ``fuse_lora``, in float32 and in bfloat16.
In float32 the fused model must equal the reference to 1e-5 (relative error of the output and of every
LoRA gradient). In bfloat16 both models are compared with the float32 reference: the fused model's
largest error may be at most 1.25 x the bfloat16 reference's own (rounding, not a bug, moves both). It
prints the errors and ``pass`` or ``FAIL`` per dtype.

    python benchmarks/check_attention.py           # CUDA (the CPU when there is none)
    python benchmarks/check_attention.py --smoke   # a small model on the CPU
"""

from __future__ import annotations

import argparse
import copy

import torch
from peft import LoraConfig, inject_adapter_in_model
from transformers import LlamaConfig, LlamaModel

from check_moe_kernels import rel

from Uni_MoE.model.attention import fuse_attention
from Uni_MoE.train.lora_linear import fuse_lora


def build(device: torch.device, hidden: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, vocab_size=1000,
                         attn_implementation="sdpa")
    model = LlamaModel(config)
    inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]), model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_B" in name:  # PEFT starts B at zero; a random B makes the update visible
            torch.nn.init.normal_(p, std=0.02)
    return model.to(device)


def run(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """The output and the LoRA gradients of one forward/backward with a fixed dropout seed; the loss is
    the output's product with a fixed random tensor."""
    torch.manual_seed(1)
    out = model(input_ids=ids, use_cache=False).last_hidden_state
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device)
    loss = (out.float() * probe).sum()
    return [out, *torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])]


def worst(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    return max(rel(a.float(), b.float()) for a, b in zip(ours, ref, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="hidden 128, 2 x 32 tokens, on the CPU")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    ref = build(device, 128 if args.smoke else 512)
    ids = torch.randint(0, 1000, (2, 32) if args.smoke else (4, 256), device=device)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        plain = copy.deepcopy(ref).to(dtype)
        fused = copy.deepcopy(plain)
        fuse_attention(fused)
        fuse_lora(fused)
        results[dtype] = run(plain, ids), run(fused, ids)
    exact, fused32 = results[torch.float32]
    err32 = worst(fused32, exact)
    ok32 = err32 <= 1e-5
    print(f"float32: fused vs reference, worst rel err {err32:.2e} -> {'pass' if ok32 else 'FAIL'}")
    plain16, fused16 = (worst(r, exact) for r in results[torch.bfloat16])
    ok16 = fused16 <= 1.25 * plain16
    print(f"bfloat16: worst rel err vs float32, fused {fused16:.2e}, reference {plain16:.2e} "
          f"-> {'pass' if ok16 else 'FAIL'}")
    raise SystemExit(0 if ok32 and ok16 else 1)


if __name__ == "__main__":
    main()
