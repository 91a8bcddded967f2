"""GatedViT: a timm VisionTransformer whose attention heads are pruned per input by learned gates,
with a Sparse Autoencoder ahead of chosen gates so the pruning can be read and steered.

The wrapper reuses timm's modules and weights (patch embedding, blocks, norms, head); it only
replaces how a gated block's attention branch is evaluated. See `../shared/DESIGN.md` for the math.
"""
from __future__ import annotations

import contextlib
import numbers
import threading
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerScale

from headsteer.kernels import reference
from headsteer.kernels.dispatch import BACKENDS, head_attention, sae_steer_gate
from headsteer.runtime.errors import InputError, UnsupportedModelError


class HeadUsage:
    """Usage views of a `head_mask` bool [B, L_gated, H] attribute."""

    head_mask: torch.Tensor

    @property
    def head_usage(self) -> torch.Tensor:
        """Per-sample fraction of gated heads kept, [B]; 1 without gated blocks (every head runs)."""
        if self.head_mask.shape[1] == 0:
            return torch.ones(self.head_mask.shape[0], device=self.head_mask.device)
        return self.head_mask.float().mean(dim=(1, 2))

    @property
    def block_usage(self) -> torch.Tensor:
        """Per-sample, per-gated-block fraction of heads kept, [B, L_gated]."""
        return self.head_mask.float().mean(dim=2)


@dataclass
class GatedViTOutput(HeadUsage):
    """What a GatedViT forward returns.

    head_mask is bool [B, L_gated, H] (gated blocks in model order). head_weight is the float mask
    of the heads: head_mask as 0/1 at inference, a straight-through Gumbel-sigmoid
    mask in training (differentiable, for the usage loss). latents maps an SAE site (block index)
    to its latents z [B, S] when they were asked for."""

    logits: torch.Tensor
    head_mask: torch.Tensor
    gate_logits: torch.Tensor
    head_weight: torch.Tensor
    latents: dict = field(default_factory=dict)


class _GateDecisions:
    """Each gated block's gate logits, keep mask and head weight, for GatedViTOutput's [B, L_gated, H].

    At inference on the CPU, logits and keep are copied into [L_gated, B, H] buffers allocated at
    the first gated block instead of living until the forward ends: glibc carves such small
    long-lived tensors out of the holes that each MLP's freed activations leave, so every MLP took
    fresh pages (about 1,300 page faults per vit_small forward at batch 1). Elsewhere they are
    kept in lists: CUDA's caching allocator has no such problem and each copy would be one more
    launch, and in training the straight-through head weights carry gradients."""

    def __init__(self, count: int, buffered: bool):
        self.count, self.buffered, self.filled = count, buffered, 0
        self.logits, self.keep, self.weights = [], [], []

    def add(self, logits: torch.Tensor, keep: torch.Tensor, weight: Optional[torch.Tensor]) -> None:
        if not self.buffered:
            self.logits.append(logits)
            self.keep.append(keep)
            self.weights.append(weight)
        else:
            if self.filled == 0:
                self.logits = logits.new_empty(self.count, *logits.shape)
                self.keep = keep.new_empty(self.count, *keep.shape)
            self.logits[self.filled] = logits
            self.keep[self.filled] = keep
        self.filled += 1

    def stacked(self, batch: int, heads: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate_logits, head_mask, head_weight), each [B, L_gated, H]."""
        if self.filled == 0:
            head_mask = torch.zeros(batch, 0, heads, dtype=torch.bool, device=like.device)
            return like.new_zeros(batch, 0, heads), head_mask, like.new_zeros(batch, 0, heads)
        if self.buffered:
            gate_logits = self.logits.transpose(0, 1).contiguous()
            head_mask = self.keep.transpose(0, 1).contiguous()
            return gate_logits, head_mask, head_mask.to(like.dtype)
        gate_logits = torch.stack(self.logits, dim=1)
        head_mask = torch.stack(self.keep, dim=1)
        weights = self.weights
        head_weight = head_mask.to(like.dtype) if weights[0] is None else torch.stack(weights, dim=1)
        return gate_logits, head_mask, head_weight


class HeadGate(nn.Module):
    """AdaViT-style head gate: `LayerNorm -> Linear(D, G) -> GELU -> Linear(G, H)` on the decision
    vector. Training uses a straight-through Gumbel-sigmoid; inference thresholds at logit 0
    (sigmoid 0.5) or keeps a fixed head budget."""

    def __init__(self, dim: int, num_heads: int, hidden_dim: int, init_bias: float = 3.0, temperature: float = 5.0):
        super().__init__()
        self.noise_scale = 1.0  # Gumbel noise multiplier in training; anneal toward 0 late in training
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, num_heads)
        self.temperature = temperature
        # A fresh gate keeps every head (sigmoid(3) ~ 0.95), as when fine-tuning from a dense model.
        nn.init.constant_(self.fc2.bias, init_bias)

    def forward(self, g: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(g))))

    def kernel_params(self) -> dict:
        """The gate's weights in the form `kernels.reference.gate_logits` takes them."""
        return dict(
            norm_weight=self.norm.weight,
            norm_bias=self.norm.bias,
            norm_eps=self.norm.eps,
            fc1_weight=self.fc1.weight,
            fc1_bias=self.fc1.bias,
            fc2_weight=self.fc2.weight,
            fc2_bias=self.fc2.bias,
        )

    def straight_through(self, logits: torch.Tensor) -> torch.Tensor:
        """Hard 0/1 mask with the gradient of a Gumbel-sigmoid (temperature `self.temperature`)."""
        uniform = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
        logistic_noise = torch.log(uniform) - torch.log1p(-uniform)  # difference of two Gumbels
        soft = torch.sigmoid((logits + self.noise_scale * logistic_noise) / self.temperature)
        hard = (soft > 0.5).to(soft.dtype)
        return hard + soft - soft.detach()


class SparseAutoencoder(nn.Module):
    """SAE on a decision vector: `z = act(W_enc (e - b_dec) + b_enc)`, `x_hat = W_dec z + b_dec`.

    decoder_weight is [S, D] with unit-norm rows (one direction per latent)."""

    def __init__(self, dim: int, width: int, activation: str = "topk", k: Optional[int] = None):
        super().__init__()
        if activation not in reference.SAE_ACTIVATIONS:
            raise InputError(f"sae_activation must be one of {reference.SAE_ACTIVATIONS}, got {activation!r}")
        if activation == "topk" and (k is None or not 1 <= k <= width):
            raise InputError(f"a topk SAE needs 1 <= sae_k <= sae_width={width}, got {k}")
        self.dim, self.width, self.activation, self.k = dim, width, activation, k
        decoder = F.normalize(torch.randn(width, dim), dim=1)
        self.encoder_weight = nn.Parameter(decoder.clone())
        self.encoder_bias = nn.Parameter(torch.zeros(width))
        self.decoder_weight = nn.Parameter(decoder)
        self.decoder_bias = nn.Parameter(torch.zeros(dim))
        # JumpReLU's per-latent threshold; kept for every activation so all bundles share one layout.
        self.threshold = nn.Parameter(torch.zeros(width), requires_grad=activation == "jumprelu")

    def kernel_params(self) -> dict:
        """The SAE's weights in the form `kernels.reference.sae_steer_gate` takes them."""
        return dict(
            enc_weight=self.encoder_weight,
            enc_bias=self.encoder_bias,
            dec_weight=self.decoder_weight,
            dec_bias=self.decoder_bias,
            activation=self.activation,
            k=self.k,
            threshold=self.threshold,
        )

    def encode(self, e: torch.Tensor) -> torch.Tensor:
        p = self.kernel_params()
        return reference.sae_encode(e, p["enc_weight"], p["enc_bias"], p["dec_bias"], self.activation, self.k, p["threshold"])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return reference.sae_decode(z, self.decoder_weight, self.decoder_bias)

    def forward(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(e)
        return self.decode(z), z

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Project decoder rows back to unit norm (call after each optimizer step)."""
        self.decoder_weight.div_(self.decoder_weight.norm(dim=1, keepdim=True).clamp_min(1e-8))


def check_budget(budget) -> None:
    """InputError unless a head budget is None or a number (of any numeric type) in [0, 1]."""
    if budget is not None and (isinstance(budget, bool) or not (isinstance(budget, numbers.Real) and 0.0 <= budget <= 1.0)):
        raise InputError(f"budget must be a number in [0, 1] or None, got {budget!r}")


def resolve_blocks(spec: Union[str, int, Sequence[int]], depth: int, what: str) -> list[int]:
    """Turn "all", "none", a slice like "1:" (AdaViT leaves block 0 ungated), an int or a list of
    (possibly negative) block indices into sorted indices."""
    if isinstance(spec, str):
        if spec == "all":
            return list(range(depth))
        if spec == "none":
            return []
        if ":" in spec:
            try:
                bounds = [int(part) if part.strip() else None for part in spec.split(":")]
                return sorted(range(depth)[slice(*bounds)])  # (a negative step selects blocks, not an order)
            except (ValueError, TypeError):
                raise InputError(f"{what} slice must look like '1:' or '2:-1', got {spec!r}") from None
        try:
            spec = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise InputError(f"{what} must be 'all', 'none', a slice like '1:' or indices like '0,3,-1', got {spec!r}") from None
    if isinstance(spec, int):
        spec = [spec]
    blocks = set()
    for index in spec:
        if not -depth <= int(index) < depth:
            raise InputError(f"{what} index {index} is out of range for a model with {depth} blocks")
        blocks.add(int(index) % depth)
    return sorted(blocks)


def check_supported(vit: nn.Module) -> None:
    """Raise UnsupportedModelError naming the first module headsteer cannot gate."""
    from timm.layers import Attention, PatchEmbed
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise UnsupportedModelError(
            f"{type(vit).__name__} is not a timm VisionTransformer; headsteer wraps timm's vision_transformer "
            "family (class token or pooled, registers, qk-norm, layer scale)"
        )
    if not isinstance(vit.patch_embed, PatchEmbed):
        # (e.g. the hybrids' HybridEmbed: a CNN stem whose conv input is not the image channels)
        raise UnsupportedModelError(
            f"patch_embed is a {type(vit.patch_embed).__name__} (CNN stem / hybrid ViT); only timm's PatchEmbed is supported"
        )
    if not vit.global_pool:
        raise UnsupportedModelError(
            "global_pool='' makes timm return per-token logits [B, N, C]; headsteer classifies images "
            "(logits [B, C]): use a pooling global_pool such as 'token', 'avg' or 'map'"
        )
    for index, block in enumerate(vit.blocks):
        name = f"blocks.{index}"
        if type(block) is not Block:
            raise UnsupportedModelError(f"{name} is a {type(block).__name__}; only timm's pre-norm Block is supported")
        attn = block.attn
        if type(attn) is not Attention:
            raise UnsupportedModelError(
                f"{name}.attn is a {type(attn).__name__} (rotary/EVA-style or custom attention); "
                "only timm.layers.Attention is supported"
            )
        if not isinstance(attn.norm, nn.Identity):
            raise UnsupportedModelError(f"{name}.attn.norm (scale_norm) mixes heads, so a head cannot be pruned alone")
        if getattr(attn, "gate", None) is not None:
            raise UnsupportedModelError(f"{name}.attn.gate (gated attention output) is not supported")


@dataclass
class _PretrainedLoad:
    """What one timm pretrained load left out: the keys (after timm's checkpoint filter and head
    drop) the model lacked from the file and the file's keys the model has no place for."""

    missing: list[str]
    unexpected: list[str]
    classifier_keys: set[str]
    strict: bool


_PRETRAINED_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _recording_pretrained_loads(loads: list, active: bool = True):
    """Record what each pretrained load inside the block (timm.create_model(pretrained=True)) left out.

    timm reads the file, applies the architecture's checkpoint filter (prefixes, older layouts,
    pos_embed resampling), drops the classifier when the class count differs, and then loads with
    strict=False, only logging missing and unexpected keys: a file of other keys builds a model of
    random weights. build_model_with_cfg calls timm.models._builder.load_pretrained by its module
    name, so that name is wrapped here to hook the model's load_state_dict and keep its result."""
    if not active:
        yield
        return
    from timm.models import _builder

    with _PRETRAINED_LOAD_LOCK:
        original = getattr(_builder, "load_pretrained", None)
        if original is None:  # another timm layout: nothing recorded (the tests would say so)
            yield
            return

        def load_pretrained(model, *args, **kwargs):
            cfg = kwargs.get("pretrained_cfg") or getattr(model, "pretrained_cfg", None) or {}
            classifiers = cfg.get("classifier") or ()
            classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
            classifier_keys = {f"{c}.{p}" for c in classifiers for p in ("weight", "bias")}

            def keep(module, incompatible):
                loads.append(_PretrainedLoad(list(incompatible.missing_keys), list(incompatible.unexpected_keys),
                                             classifier_keys, bool(kwargs.get("strict", True))))

            handle = model.register_load_state_dict_post_hook(keep)
            try:
                return original(model, *args, **kwargs)
            finally:
                handle.remove()

        _builder.load_pretrained = load_pretrained
        try:
            yield
        finally:
            _builder.load_pretrained = original


def checkpoint_load_failure(pretrained_file, name: str, timm_kwargs: dict) -> str:
    """The opening of every error about a checkpoint that does not load into a timm model: the file,
    the model and the options given (the class count aside: timm resets the head for it)."""
    options = {k: v for k, v in timm_kwargs.items() if k != "num_classes"}
    return f"cannot load {pretrained_file} into timm {name} with {options}"


def _check_pretrained_keys(loads: list, pretrained_file, name: str, timm_kwargs: dict) -> None:
    """InputError naming the file and the keys if the (last) pretrained load left any of the model's
    weights out, or (unless timm's own loader is lenient for this architecture) brought keys the model
    has no place for. The classifier head is aside: timm reinitializes it for another class count."""
    if pretrained_file is None or not loads:
        return
    load = loads[-1]
    missing = [key for key in load.missing if key not in load.classifier_keys]
    unexpected = [key for key in load.unexpected if key not in load.classifier_keys] if load.strict else []
    if not missing and not unexpected:
        return

    def listed(keys: list[str], what: str, shown: int = 5) -> str:
        if not keys:
            return f"0 {what}"
        more = f", ... {len(keys) - shown} more" if len(keys) > shown else ""
        return f"{len(keys)} {what} ({', '.join(keys[:shown])}{more})"

    raise InputError(
        f"{checkpoint_load_failure(pretrained_file, name, timm_kwargs)}: the checkpoint's keys do not match "
        f"the model's (classifier head aside): {listed(missing, 'missing')}, {listed(unexpected, 'unexpected')}; "
        "a checkpoint of another architecture or configuration? (missing weights would keep their random "
        "initialization)"
    ) from None


class GatedViT(nn.Module):
    """A timm VisionTransformer with per-input head gates, SAEs ahead of chosen gates, and steering.

    Build with `GatedViT.from_timm(...)`. `forward` returns a `GatedViTOutput`."""

    def __init__(
        self,
        vit: nn.Module,
        *,
        gate_blocks: Union[str, Sequence[int]] = "all",
        sae_blocks: Union[str, Sequence[int]] = (-1,),
        sae_width: Optional[int] = None,
        sae_activation: str = "topk",
        sae_k: Optional[int] = None,
        gate_hidden: Optional[int] = None,
        gate_init_bias: float = 3.0,
        steer_mode: str = "preserve-error",
        timm_name: Optional[str] = None,
        timm_kwargs: Optional[dict] = None,
    ):
        super().__init__()
        check_supported(vit)
        if steer_mode not in reference.STEER_MODES:
            raise InputError(f"steer_mode must be one of {reference.STEER_MODES}, got {steer_mode!r}")
        depth = len(vit.blocks)
        self.vit = vit
        self.embed_dim = vit.embed_dim
        self.num_heads = vit.blocks[0].attn.num_heads
        self.gate_blocks = resolve_blocks(gate_blocks, depth, "gate_blocks")
        self.sae_blocks = resolve_blocks(sae_blocks, depth, "sae_blocks")
        ungated = sorted(set(self.sae_blocks) - set(self.gate_blocks))
        if ungated:
            raise InputError(f"sae_blocks {ungated} are not gated; an SAE sits ahead of a gate (gate_blocks={self.gate_blocks})")
        heads = {block.attn.num_heads for block in vit.blocks}
        if len(heads) != 1:
            raise UnsupportedModelError(f"blocks have different head counts {sorted(heads)}; head_mask needs one H")
        self.sae_width = sae_width or 4 * self.embed_dim
        self.sae_activation = sae_activation
        self.sae_k = sae_k if sae_k is not None else (min(16, self.sae_width) if sae_activation == "topk" else None)
        self.gate_hidden = gate_hidden or max(16, self.embed_dim // 4)
        self.gate_init_bias = gate_init_bias
        self.steer_mode = steer_mode
        self.timm_name = timm_name
        self.timm_kwargs = dict(timm_kwargs or {})
        self.gates = nn.ModuleDict(
            {str(i): HeadGate(self.embed_dim, self.num_heads, self.gate_hidden, gate_init_bias) for i in self.gate_blocks}
        )
        self.saes = nn.ModuleDict(
            {str(i): SparseAutoencoder(self.embed_dim, self.sae_width, sae_activation, self.sae_k) for i in self.sae_blocks}
        )

    @classmethod
    def from_timm(
        cls,
        model_or_name: Union[str, nn.Module],
        *,
        gate_blocks: Union[str, Sequence[int]] = "all",
        sae_blocks: Union[str, Sequence[int]] = (-1,),
        sae_width: Optional[int] = None,
        sae_activation: str = "topk",
        sae_k: Optional[int] = None,
        gate_hidden: Optional[int] = None,
        gate_init_bias: float = 3.0,
        steer_mode: str = "preserve-error",
        pretrained_file: Optional[str] = None,
        timm_kwargs: Optional[dict] = None,
    ) -> "GatedViT":
        """Wrap a timm VisionTransformer (an instance, or a model name built with `timm_kwargs`).

        `pretrained_file` loads timm weights from a local file (nothing is downloaded). A bundle
        can only be saved from a model built by name, since timm must rebuild it on load."""
        import timm

        timm_kwargs = dict(timm_kwargs or {})
        if isinstance(model_or_name, str):
            name = model_or_name
            # is_model ignores a pretrained tag ("vit_small_patch16_224.augreg_in21k"), which
            # create_model accepts and which picks the pretrained config a weights file matches.
            if not timm.is_model(name):
                raise UnsupportedModelError(f"timm has no model named {name!r}")
            try:
                timm.models.get_pretrained_cfg(name)
            except RuntimeError as error:  # an unknown tag: "Invalid pretrained tag (x) for arch."
                raise UnsupportedModelError(f"timm model name {name!r}: {error}") from None
            build_kwargs = dict(timm_kwargs)
            loads: list[_PretrainedLoad] = []
            if pretrained_file is not None:
                build_kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(pretrained_file)))
            try:
                with _recording_pretrained_loads(loads, active=pretrained_file is not None):
                    vit = timm.create_model(name, **build_kwargs)
            except TypeError as error:  # e.g. ViT options (img_size) given to a ResNet, or a misspelt one
                if "keyword argument" not in str(error):
                    raise
                raise UnsupportedModelError(
                    f"timm model {name!r} cannot be built with timm_kwargs {timm_kwargs}: {error} "
                    "(headsteer wraps timm's vision_transformer family)"
                ) from None
            except Exception:  # a strict load (the checkpoint's class count) raises torch's own text
                _check_pretrained_keys(loads, pretrained_file, name, timm_kwargs)
                raise
            _check_pretrained_keys(loads, pretrained_file, name, timm_kwargs)
        else:
            if pretrained_file is not None:
                raise InputError("pretrained_file only applies when from_timm is given a model name")
            vit, name = model_or_name, None
        return cls(
            vit,
            gate_blocks=gate_blocks,
            sae_blocks=sae_blocks,
            sae_width=sae_width,
            sae_activation=sae_activation,
            sae_k=sae_k,
            gate_hidden=gate_hidden,
            gate_init_bias=gate_init_bias,
            steer_mode=steer_mode,
            timm_name=name,
            timm_kwargs=timm_kwargs if name else None,
        )

    # -- shapes the outside world needs -------------------------------------------------------
    @property
    def sae_widths(self) -> list[int]:
        """Latent count of each SAE site, in site (block) order."""
        return [self.saes[str(i)].width for i in self.sae_blocks]

    @property
    def sae_offsets(self) -> list[int]:
        """Start of each SAE site's slice in a [B, S_total] steering vector."""
        return [sum(self.sae_widths[:i]) for i in range(len(self.sae_blocks))]

    @property
    def steer_width(self) -> int:
        """S_total: the width of `steer_scale` / `steer_shift` (SAE widths concatenated)."""
        return sum(self.sae_widths)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.img_size)

    def config(self) -> dict:
        """Everything beyond weights needed to rebuild this model (stored in a bundle)."""
        return dict(
            timm_name=self.timm_name,
            timm_kwargs=self.timm_kwargs,
            gate_blocks=self.gate_blocks,
            sae_blocks=self.sae_blocks,
            sae_width=self.sae_width,
            sae_activation=self.sae_activation,
            sae_k=self.sae_k,
            gate_hidden=self.gate_hidden,
            gate_init_bias=self.gate_init_bias,
            steer_mode=self.steer_mode,
        )

    # -- forward --------------------------------------------------------------------------------
    def _check_inputs(self, pixel_values, steer_scale, steer_shift, budget, backend) -> None:
        if backend not in BACKENDS:
            raise InputError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise InputError(f"pixel_values must be a [B, C, H, W] tensor, got {got}")
        weight_dtype, device = self.vit.patch_embed.proj.weight.dtype, self.vit.patch_embed.proj.weight.device
        if pixel_values.dtype != weight_dtype:
            raise InputError(f"pixel_values is {pixel_values.dtype}; the model's weights are {weight_dtype} "
                             f"(cast the input, or the model with .to(dtype))")
        if pixel_values.device != device:
            raise InputError(f"pixel_values is on {pixel_values.device}; the model is on {device} (move the input with .to)")
        in_chans = self.vit.patch_embed.proj.in_channels
        if pixel_values.shape[1] != in_chans:
            raise InputError(f"pixel_values has {pixel_values.shape[1]} channels; the model expects {in_chans}")
        size = tuple(pixel_values.shape[2:])
        if not getattr(self.vit, "dynamic_img_size", False):
            if size != self.image_size:
                raise InputError(f"pixel_values is {size} pixels; the model expects {self.image_size}")
        elif getattr(self.vit.patch_embed, "dynamic_img_pad", False):
            if min(size) < 1:
                raise InputError(f"pixel_values is {size} pixels; the model needs at least one pixel per side")
        else:
            patch = tuple(self.vit.patch_embed.patch_size)
            if any(side < step or side % step for side, step in zip(size, patch)):
                raise InputError(
                    f"pixel_values is {size} pixels; this dynamic-size model takes positive multiples of its "
                    f"patch size {patch} (or build it with dynamic_img_pad=True)"
                )
        for name, vector in (("steer_scale", steer_scale), ("steer_shift", steer_shift)):
            if vector is None:
                continue
            expected = (pixel_values.shape[0], self.steer_width)
            if not isinstance(vector, torch.Tensor) or tuple(vector.shape) != expected:
                got = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
                raise InputError(f"{name} must be [B, S_total] = {list(expected)}, got {got}")
            if not vector.is_floating_point():
                raise InputError(f"{name} must be floating point, got {vector.dtype}")
            if vector.device != device:
                raise InputError(f"{name} is on {vector.device}; the model is on {device} (move it with .to)")
        check_budget(budget)

    def _decide(self, block_index, e, steer_scale, steer_shift, budget, backend, latents):
        """Gate one block: (gate logits [B, H], keep [B, H] bool, head weight): the weight is the
        straight-through [B, H] float mask when training the gates, else None (keep as 0/1)."""
        gate = self.gates[str(block_index)]
        sae = self.saes[str(block_index)] if str(block_index) in self.saes else None
        scale = shift = None
        if sae is not None:
            start = self.sae_offsets[self.sae_blocks.index(block_index)]
            if steer_scale is not None:
                scale = steer_scale[:, start : start + sae.width]
            if steer_shift is not None:
                shift = steer_shift[:, start : start + sae.width]
            if latents is not None:
                latents[block_index] = sae.encode(e)
        if self.training and budget is None:
            # Training: the gate sees the same steered input; the mask is straight-through.
            g = e
            if sae is not None:
                z = sae.encode(e) if latents is None else latents[block_index]
                g = reference.steer_gate_input(e, z, sae.decoder_weight, sae.decoder_bias, scale, shift, self.steer_mode)
            logits = gate(g)
            weight = gate.straight_through(logits)
            return logits, weight > 0.5, weight
        sae_params = sae.kernel_params() if sae is not None else None
        logits, keep = sae_steer_gate(
            backend, e, gate.kernel_params(), sae_params, scale, shift, self.steer_mode, budget
        )
        # (no head weight: every backend reads keep, the masked reference path as 0/1)
        return logits, keep, None

    def forward_features(
        self,
        pixel_values: torch.Tensor,
        steer_scale: Optional[torch.Tensor] = None,
        steer_shift: Optional[torch.Tensor] = None,
        budget: Optional[float] = None,
        backend: str = "reference",
        return_latents: bool = False,
    ):
        """Tokens after the final norm, the gated blocks' `_GateDecisions`, and latents."""
        vit = self.vit
        x = vit.patch_embed(pixel_values)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        has_class_token = getattr(vit, "cls_token", None) is not None
        gated = set(self.gate_blocks)
        decisions = _GateDecisions(len(gated), buffered=not self.training and x.device.type == "cpu")
        latents = {} if return_latents else None
        for index, block in enumerate(vit.blocks):
            if index not in gated:
                x = block(x)
                continue
            e = reference.decision_vector(x, vit.num_prefix_tokens, has_class_token)
            logits, keep, weight = self._decide(index, e, steer_scale, steer_shift, budget, backend, latents)
            decisions.add(logits, keep, weight)
            if not self.training and isinstance(block.ls1, (nn.Identity, LayerScale)):
                # x + ls1(attention): one call, so the triton backend adds it in its epilogue
                # (drop_path1 is the identity at inference).
                x = head_attention(backend, block.norm1(x), keep, weight, block.attn, residual=x,
                                   layer_scale=getattr(block.ls1, "gamma", None))
            else:
                branch = head_attention(backend, block.norm1(x), keep, weight, block.attn, training=self.training)
                x = x + block.drop_path1(block.ls1(branch))
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return vit.norm(x), decisions, latents

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(x)

    def forward(
        self,
        pixel_values: torch.Tensor,
        steer_scale: Optional[torch.Tensor] = None,
        steer_shift: Optional[torch.Tensor] = None,
        budget: Optional[float] = None,
        backend: str = "reference",
        return_latents: bool = False,
    ) -> GatedViTOutput:
        """Classify `pixel_values` [B, C, H, W] with per-input head pruning.

        steer_scale/steer_shift: [B, S_total] (None = identity). budget: keep exactly
        round(budget*H) heads per gated block (None = the gate's own threshold). backend:
        "reference" (masked dense, the spec), "compact" (only kept heads), "triton".
        Shapes and dtypes are checked here; values are not (a NaN check would wait on the device,
        which the triton path and CUDA-graph capture must not): `Engine` refuses non-finite inputs."""
        self._check_inputs(pixel_values, steer_scale, steer_shift, budget, backend)
        x, decisions, latents = self.forward_features(
            pixel_values, steer_scale, steer_shift, budget, backend, return_latents
        )
        gate_logits, head_mask, head_weight = decisions.stacked(pixel_values.shape[0], self.num_heads, x)
        return GatedViTOutput(
            logits=self.forward_head(x),
            head_mask=head_mask,
            gate_logits=gate_logits,
            head_weight=head_weight,
            latents=latents or {},
        )


def identity_steering(batch: int, width: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(`steer_scale`, `steer_shift`) that leave every latent as it is: ones and zeros."""
    return torch.ones(batch, width, device=device, dtype=dtype), torch.zeros(batch, width, device=device, dtype=dtype)


__all__ = [
    "GatedViT",
    "GatedViTOutput",
    "HeadGate",
    "SparseAutoencoder",
    "check_supported",
    "identity_steering",
]
