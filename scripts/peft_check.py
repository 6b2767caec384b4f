"""Loads tune-rs adapters with Hugging Face PEFT and checks them against tune-rs's merged weights.

For each adapter kind (LoRA on q/v; LoRA on every projection, the MLP and the output; DoRA; the
IA3 example plugin, when plugins/ia3 is built), it trains stories260K for 30 steps with the
release `tune`, then compares on a fixed batch:
  PeftModel.from_pretrained(base, epoch_0/adapter)   logits
  AutoPeftModelForCausalLM.from_pretrained(adapter)  logits (base found through the adapter config)
  AutoModelForCausalLM.from_pretrained(epoch_0)      logits (tune-rs's merged weights)
They must agree (fp32), and differ from the base model's (the adapter did something).

Needs torch, transformers and peft; not part of CI. From the repository root:
    python scripts/peft_check.py [path/to/tune]
"""
import pathlib
import subprocess
import sys
import tempfile

import torch
import peft
import transformers
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

ROOT = pathlib.Path(__file__).resolve().parents[1]
TUNE = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "target/release/tune")
# Each kind: options before the recipe name, then overrides.
KINDS = {
    "lora_qv": ([], []),
    "lora_all": ([], [
        "model.lora_attn_modules=[q_proj,k_proj,v_proj,output_proj]",
        "model.apply_lora_to_mlp=True",
        "model.apply_lora_to_output=True",
    ]),
    "dora_qv": ([], ["model.use_dora=True"]),
}
IA3 = ROOT / "plugins/ia3/target/release/libtune_ia3.so"
if IA3.is_file():
    KINDS["ia3_plugin"] = (["--plugin", str(IA3)], [
        "model.adapter=ia3",
        "model.lora_attn_modules=[k_proj,v_proj]",
        "model.apply_lora_to_mlp=True",
        "optimizer.lr=3e-2",
    ])

torch.manual_seed(0)
tokens = torch.randint(3, 512, (2, 48))
base_dir = ROOT / "assets/stories260K"


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


base_logits = logits(AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32))
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
failed = False
for kind, (options, overrides) in KINDS.items():
    out = pathlib.Path(tempfile.mkdtemp()) / kind
    subprocess.run(
        [TUNE, "run", *options, "lora_finetune_single_device", "--config", "stories260K/lora_single_device",
         f"output_dir={out}", "max_steps_per_epoch=30", *overrides],
        cwd=ROOT, check=True, capture_output=True,
    )
    epoch = out / "epoch_0"
    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    with_peft = logits(PeftModel.from_pretrained(base, epoch / "adapter"))
    auto = logits(AutoPeftModelForCausalLM.from_pretrained(epoch / "adapter", torch_dtype=torch.float32))
    merged = logits(AutoModelForCausalLM.from_pretrained(epoch, torch_dtype=torch.float32))
    peft_vs_merged = (with_peft - merged).abs().max().item()
    auto_vs_merged = (auto - merged).abs().max().item()
    adapter_effect = (merged - base_logits).abs().max().item()
    ok = peft_vs_merged < 1e-4 and auto_vs_merged < 1e-4 and adapter_effect > 1e-3
    failed |= not ok
    print(
        f"{kind}: max |PEFT - merged| = {peft_vs_merged:.2e}, max |AutoPeft - merged| = "
        f"{auto_vs_merged:.2e}, max |merged - base| = {adapter_effect:.2e}: {'pass' if ok else 'FAIL'}"
    )
sys.exit(1 if failed else 0)
