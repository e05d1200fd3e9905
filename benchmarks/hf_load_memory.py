"""Peak memory of ``memlayers.integrations.hf.from_pretrained``: a bfloat16 Llama-style model with a Memory+
layer is saved, then loaded in a fresh process while a thread samples the process's anonymous memory (Linux).

    python benchmarks/hf_load_memory.py                 # ~500 MiB model (12 layers, d=1024, 65k-slot memory)
    python benchmarks/hf_load_memory.py --layers 4      # smaller

Prints the model's size and, above the imports, the process's peak resident memory (VmHWM: file pages of the
memory-mapped safetensors included) and its peak anonymous memory (RssAnon, sampled: what the kernel cannot
drop), each also as a multiple of the model's size.
"""

import argparse
import os
import subprocess
import sys
import tempfile

LOAD = """
import sys, threading, time
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024
anon = lambda: status("RssAnon")
from memlayers.integrations.hf import from_pretrained
peak, done = [0.0], []
def sample():
    while not done:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
base, base_rss = anon(), status("VmRSS")
thread = threading.Thread(target=sample)
thread.start()
model = from_pretrained(sys.argv[1])
done.append(1)
thread.join()
size = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
print(f"{size:.0f} {status('VmHWM') - base_rss:.0f} {peak[0] - base:.0f}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="decoder layers (default 12)")
    parser.add_argument("--dim", type=int, default=1024, help="model width (default 1024)")
    parser.add_argument("--n-keys", type=int, default=256, help="the memory's sub-keys: n_keys^2 slots (default 256)")
    args = parser.parse_args()
    if not os.path.exists("/proc/self/status"):
        sys.exit("hf_load_memory: needs Linux (/proc/self/status)")
    import torch
    import transformers

    from memlayers.integrations.hf import add_memory_layers

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=args.dim, intermediate_size=args.dim * 11 // 4,
                                      num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4)  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    add_memory_layers(model, layers=str(args.layers // 2), preset="memory_plus", n_keys=args.n_keys)
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)
        del model
        size, rss, anon = map(float, subprocess.check_output([sys.executable, "-c", LOAD, out], text=True).split())
    print("| model (bf16) | peak resident memory | peak anonymous memory |\n|---:|---:|---:|")
    print(f"| {size:,.0f} MiB | {rss:,.0f} MiB ({rss / size:.2f}x) | {anon:,.0f} MiB ({anon / size:.2f}x) |")


if __name__ == "__main__":
    main()
