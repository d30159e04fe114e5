"""What a compressed model costs to run: size, MACs, latency and peak memory on one fixed probe.

The probe is one synthetic picture and one question, the same for every model, so the
numbers compare checkpoints rather than benchmark mixes. How each number is taken:

- total_params / lm_params: `harness.models.flops.count_params` and
  `LMAdapter.lm_parameters()` (the paper's "LM size": decoder, embeddings, LM head).
- macs_per_token: `harness.models.flops.lm_macs_per_token` at the probe's prompt length.
- prefill_ms: fastest wall time of one forward pass over the probe prompt (image included).
- decode_ms_per_token: (fastest generate of N+1 tokens - fastest of 1 token) / N, forced to
  length N+1, so prefill and generate's fixed overhead cancel out.
- peak_memory_mb: on CUDA, `torch.cuda.max_memory_allocated` after a reset (tensors only);
  on CPU, the process's peak resident set size (VmHWM) during the probe, after resetting it
  through /proc/self/clear_refs (Linux); where that reset is refused, `ru_maxrss` of the
  whole process (an upper bound). Both include the weights. tracemalloc is not used: it
  does not see torch's allocations.
- samples_per_s is not measured here: `evaluate` takes it from the plugin's model time
  over the real benchmark samples.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

from harness.evaluation.generate import build_prompt, model_inputs

PROBE_QUESTION = "what color is the object at the center? one word."
PROBE_SIZE = 64


def probe_inputs(model, processor):
    """The fixed probe: a seeded noise image and one question, through the chat template.

    The image's content does not change the compute (the processor resizes it to the
    model's input size); seeded noise keeps the probe identical from run to run.
    """
    from PIL import Image

    pixels = torch.randint(0, 256, (PROBE_SIZE, PROBE_SIZE, 3), generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(pixels.to(torch.uint8).numpy(), "RGB")
    return model_inputs(model, processor, [build_prompt(processor, PROBE_QUESTION, 1)], [image])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    """The fastest of `repeats` timed calls: other load on the machine only ever adds time."""
    fn()  # warm-up: kernels, allocator, lazy init
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def reset_cpu_peak() -> bool:
    """Reset the kernel's peak-RSS counter for this process; False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cpu_peak_mb(reset_worked: bool) -> float:
    if reset_worked:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@torch.no_grad()
def latency(model, processor, decode_tokens: int = 16, repeats: int = 5) -> dict:
    """prefill_ms, decode_ms_per_token and peak_memory_mb on the probe."""
    device = next(model.parameters()).device
    inputs = probe_inputs(model, processor)
    tok = processor.tokenizer

    def generate(n: int):
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_worked = reset_cpu_peak() if device.type != "cuda" else False
    prefill = _best_seconds(lambda: model(**inputs, use_cache=True), device, repeats)
    one = _best_seconds(lambda: generate(1), device, repeats)
    many = _best_seconds(lambda: generate(decode_tokens + 1), device, repeats)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _cpu_peak_mb(reset_worked)
    return {
        "prefill_ms": 1000 * prefill,
        "decode_ms_per_token": 1000 * max(many - one, 0.0) / decode_tokens,
        "peak_memory_mb": peak,
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda"
        else ("cpu_peak_rss" if reset_worked else "cpu_process_max_rss"),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "device": str(device),
    }


def measure(model, processor, decode_tokens: int = 16, repeats: int = 5) -> dict:
    """All static and timed efficiency numbers for one model (samples_per_s is added by evaluate)."""
    from harness.models.adapter import LMAdapter
    from harness.models.flops import count_params, lm_macs_per_token

    timed = latency(model, processor, decode_tokens=decode_tokens, repeats=repeats)
    return {
        "total_params": int(count_params(model)),
        "lm_params": int(LMAdapter(model).lm_parameters()),
        "macs_per_token": float(lm_macs_per_token(model, context=timed["prompt_tokens"])),
        **timed,
    }
