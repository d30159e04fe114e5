"""`PruneSettings`: every knob of `harness prune` besides the model, method, ratios and output.

The one definition from which `harness prune`'s flags, the grid spec's `prune.settings`
checks and the dry run's plan follow. Width-only settings (metadata `family: width`)
are refused for layer methods, which remove whole layers; they are also what makes two
pruning runs of the same model, method and ratio different (`IDENTITY`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from harness.errors import HarnessError
from harness.models.flops import DEFAULT_CONTEXT
from harness.pruning.calibration import DEFAULT_SEED
from harness.pruning.methods import get_method
from harness.settings import setting


def _width(default, help: str, **kw):
    return setting(default, help, family="width", **kw)


@dataclass(frozen=True)
class PruneSettings:
    calib_samples: int | None = setting(None, "calibration samples (default: the method's; 50 for layer methods, "
                                              "10 for taylor/activation)", positive=True)
    calib_seed: int = setting(DEFAULT_SEED, "seed drawing the calibration samples")
    calib_max_text_tokens: int | None = setting(None, "calibrate only on samples whose text has at most N tokens "
                                                      "(the official code: 128 for LLaVA, 64 for Bunny)",
                                                positive=True)
    calib_require_image: bool = setting(False, "calibrate only on samples that carry an image (the official code)")
    batch_size: int = setting(1, "calibration batch size", positive=True)
    max_length: int = setting(512, "calibration sequence length (tokens, image tokens included)", positive=True)
    per_layer_ratio: bool = _width(False, "ratio is the fraction of heads and channels removed in each layer of the "
                                          "ranges")
    attn_layers: str | list[int] | None = _width(None, "attention layers to prune, START:END (end exclusive)")
    mlp_layers: str | list[int] | None = _width(None, "MLP layers to prune, START:END (end exclusive)")
    attn_unit: str = _width("group", "attention unit removed: group (a KV head with its query heads) or query "
                                     "(one query head in every KV group; grouped-query attention only)")
    round_to: int = _width(1, "keep MLP widths (and with --prune-hidden the hidden width) multiples of N",
                           positive=True)
    prune_hidden: bool = _width(False, "width methods: also prune the hidden size (embeddings, norms, every "
                                       "projection, LM head, projector), the same fraction as heads and channels")
    context: int = setting(DEFAULT_CONTEXT, "context length the MACs in pruning.json are counted at", positive=True,
                           flag=False)

    def validate(self) -> PruneSettings:
        from harness.pruning.plan import ATTN_UNITS

        if self.attn_unit not in ATTN_UNITS:
            raise HarnessError(f"attn_unit must be one of {', '.join(ATTN_UNITS)}, got {self.attn_unit!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("positive") and value is not None and value < 1:
                raise HarnessError(f"{f.name} must be >= 1, got {value!r}")
        return self

    def for_method(self, method: str) -> PruneSettings:
        """Refuse width settings for a layer method: they would be silently meaningless."""
        if get_method(method).family == "layer":
            changed = [f.name for f in dataclasses.fields(self)
                       if f.metadata.get("family") == "width" and getattr(self, f.name) != f.default]
            if changed:
                raise HarnessError(f"{', '.join(changed)} apply to width methods only, not to {method}")
        return self

    def calibration_size(self, method: str) -> int:
        """Samples this run scores on: the setting, else the method's default (0: no calibration)."""
        scorer = get_method(method)
        if not scorer.needs_calibration:
            return 0
        return self.calib_samples if self.calib_samples is not None else scorer.calib_samples

    def calibration(self, method: str) -> dict:
        """What `pruning.json` records about the calibration set (empty for methods without one)."""
        if not get_method(method).needs_calibration:
            return {}
        return {"samples": self.calibration_size(method), "seed": self.calib_seed, "batch_size": self.batch_size,
                "max_length": self.max_length, "max_text_tokens": self.calib_max_text_tokens,
                "require_image": self.calib_require_image}

    def width(self) -> dict:
        """The width settings, as `apply_pruning` takes them and `pruning.json` records them."""
        return {name: getattr(self, name) for name in WIDTH_SETTINGS}


WIDTH_SETTINGS = tuple(f.name for f in dataclasses.fields(PruneSettings) if f.metadata.get("family") == "width")
# What makes two pruning runs "the same": an output dir holding a run with these values may be overwritten.
IDENTITY = ("source_fingerprint", "method", "ratio_requested", *WIDTH_SETTINGS)
