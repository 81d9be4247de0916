"""Which layers bitsandbytes can quantize where the model runs, decided before loading.

Layers the kernels cannot take are kept in the model's dtype (``llm_int8_skip_modules``) and logged, so a
model loads and answers instead of failing at its first request; when no layer would be left to quantize
the load is refused with a message that says why.

nf4 on a CPU with AVX512-BF16: bitsandbytes (0.49, 0.50) repacks each 4-bit weight at its first forward
pass (``functional._convert_weight_packed_for_cpu``) into blocks of 32 output rows, with one absmax per
64-wide quantization block of each row. A layer whose output features are not a multiple of 32, or whose
input features are not a multiple of 64, fails there (``shape '[32, 0]' is invalid``). Without that CPU
feature, and on CUDA, the weights are not repacked and every shape works. The feature test is the one
``bitsandbytes.nn.Linear4bit`` itself uses, so the decision and the library's path cannot disagree.

int8: the vision tower, the projector and lm_head stay unquantized on every device. bitsandbytes' CPU
int8 path flattens 2-D and 3-D inputs only, and the projector is fed 5-D vision features; the vision
tower is small next to the text model and loses accuracy in int8.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("llamactl.server.engine")

PACK_ROWS = 32  # output rows per packed block (block_n of _convert_weight_packed_for_cpu)
NF4_BLOCKSIZE = 64  # bitsandbytes' default 4-bit quantization block; transformers does not change it
INT8_SKIP = (
    # transformers matches these from the start of a module's path or as a suffix: both layouts listed
    "model.vision_model", "model.multi_modal_projector", "vision_model", "multi_modal_projector", "lm_head",
)
DEFAULT_SKIP = ("lm_head",)  # what transformers keeps unquantized when it is given no list


class QuantizationUnsupported(RuntimeError):
    """No layer of this model can be quantized this way on this device."""


@dataclass(frozen=True)
class Linear:
    name: str
    out_features: int
    in_features: int


@dataclass(frozen=True)
class QuantPlan:
    """``skip`` for ``llm_int8_skip_modules`` (None: transformers' default), ``kept``: layers left in full
    precision because the kernels cannot take them (logged)."""

    skip: tuple[str, ...] | None
    kept: tuple[Linear, ...] = ()

    def summary(self, quantization: str) -> str:
        by_part: dict[str, int] = {}
        for layer in self.kept:
            part = ".".join(layer.name.split(".")[:2])
            by_part[part] = by_part.get(part, 0) + 1
        parts = ", ".join(f"{name}: {count}" for name, count in sorted(by_part.items()))
        return (f"{quantization}: {len(self.kept)} linear layer(s) kept unquantized, their shapes do not fit "
                f"bitsandbytes' packed AVX512-BF16 CPU kernels (output features a multiple of {PACK_ROWS}, "
                f"input features a multiple of {NF4_BLOCKSIZE}) ({parts})")


def packs_on_cpu(layer: Linear) -> bool:
    """Whether bitsandbytes' packed CPU layout can hold this layer's 4-bit weight."""
    return layer.out_features % PACK_ROWS == 0 and layer.in_features % NF4_BLOCKSIZE == 0


def plan(
    quantization: str, device: str, linears: Sequence[Linear], cpu_packs: bool,
    default_skip: Sequence[str] = DEFAULT_SKIP,
) -> QuantPlan:
    """What to keep unquantized (pure). ``cpu_packs``: bitsandbytes takes its packed AVX512-BF16 path."""
    if quantization == "int8":
        return QuantPlan(skip=INT8_SKIP)
    if quantization != "nf4" or device != "cpu" or not cpu_packs:
        return QuantPlan(skip=None)
    quantized = [l for l in linears if not _matches(l.name, default_skip)]
    unfit = [l for l in quantized if not packs_on_cpu(l)]
    if not unfit:
        return QuantPlan(skip=None)
    if len(unfit) == len(quantized):
        example = unfit[0]
        raise QuantizationUnsupported(
            f"nf4 on this CPU (AVX512-BF16, bitsandbytes' packed kernels): none of the model's "
            f"{len(quantized)} linear layers has output features a multiple of {PACK_ROWS} and input features "
            f"a multiple of {NF4_BLOCKSIZE} (e.g. {example.name}: {example.out_features}x{example.in_features});"
            " use quantization none, or a GPU")
    return QuantPlan(skip=tuple(_covering(unfit, linears)) + tuple(default_skip), kept=tuple(unfit))


def _matches(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or name.endswith("." + p) for p in prefixes)


def _covering(unfit: Sequence[Linear], linears: Sequence[Linear]) -> list[str]:
    """The shortest module paths that hold unfit layers only (``model.vision_model`` rather than its
    every projection), in order of first appearance."""
    unfit_names = {l.name for l in unfit}
    names = [l.name for l in linears]
    out: list[str] = []
    for layer in unfit:
        parts = layer.name.split(".")
        for cut in range(1, len(parts) + 1):
            prefix = ".".join(parts[:cut])
            under = [n for n in names if n == prefix or n.startswith(prefix + ".")]
            if all(n in unfit_names for n in under):
                if prefix not in out:
                    out.append(prefix)
                break
    return out


# -- edges: the model's layer shapes and the CPU feature, as bitsandbytes sees them ------------------------

def cpu_packs_nf4() -> bool:
    """bitsandbytes' own test (looked up at call time, so a test can force either path)."""
    from bitsandbytes.nn import modules

    feature: Any = getattr(modules, "has_avx512bf16")  # noqa: B009 - untyped library attribute
    return bool(feature())


def linear_layers(model: str, revision: str | None) -> tuple[list[Linear], list[str]]:
    """Every nn.Linear of the checkpoint's architecture, built on the meta device (no weights read), and
    the modules transformers would keep unquantized by default."""
    import torch
    import transformers
    from accelerate import init_empty_weights

    tf: Any = transformers
    config = tf.AutoConfig.from_pretrained(model, **({"revision": revision} if revision else {}))
    with init_empty_weights():
        skeleton = tf.AutoModelForImageTextToText.from_config(config)
    layers = [Linear(name, m.out_features, m.in_features) for name, m in skeleton.named_modules()
              if isinstance(m, torch.nn.Linear)]
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        defaults = sorted(get_keys_to_not_convert(skeleton))
    except (ImportError, AttributeError):  # an internal helper: fall back on what it returns for Mllama
        defaults = list(DEFAULT_SKIP)
    return layers, defaults


def skip_modules(quantization: str, device: str, model: str, revision: str | None) -> list[str] | None:
    """``llm_int8_skip_modules`` for loading ``model`` quantized on ``device``; logs what it keeps."""
    if quantization == "nf4" and device == "cpu" and cpu_packs_nf4():
        layers, defaults = linear_layers(model, revision)
        chosen = plan(quantization, device, layers, True, defaults)
        if chosen.kept:
            log.warning("%s", chosen.summary(quantization))
    else:
        chosen = plan(quantization, device, [], False)
    return None if chosen.skip is None else list(chosen.skip)
