"""Training recipes: backbone, head gates, SAEs and the steering table, each a function and a
`headsteer train RECIPE` subcommand, each resumable from a bundle.

The stages chain through bundles:

    backbone  -> a GatedViT with no gates (the dense timm ViT), trained from scratch or from a
                 local timm checkpoint (`pretrained_file`), or continued from a bundle;
    gates     -> AdaViT-style head gates on every block (straight-through Gumbel-sigmoid) trained
                 with cross-entropy plus a usage loss, by default ("block")
                 `usage_weight * mean over gated blocks of |usage of the block - target_usage|`
                 (AdaViT's whole-model `|mean(head_weight) - target|` is "model"), the backbone
                 fine-tuned jointly or frozen;
    sae       -> a Sparse Autoencoder (TopK or ReLU; JumpReLU SAEs load and run but are not
                 trained here) on the decision vector (residual stream entering the block, class
                 token) of the chosen SAE sites (default: the last block), trained on decision
                 vectors of the frozen gated model; FVE, L0 and dead latents on val;
    steering  -> the per-class steering table (`headsteer.runtime.steering`), chosen on val.

Every recipe seeds torch and uses a seeded data order, so the same arguments give the same weights
(on the same machine and thread count). Every bundle records its data spec and split seed
(`extra["data"]`); a recipe continuing a bundle splits the data with that seed, so its validation
and test images are never ones an earlier stage trained on.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from tqdm.auto import tqdm

from headsteer.runtime.bundle import check_replaceable, load_bundle, save_bundle
from headsteer.runtime.data import (ImageDataset, Splits, check_seed, data_record, load_data, recorded_split_seed,
                                    resolve_split_seed)
from headsteer.runtime.errors import BundleError, HeadsteerError, InputError
from headsteer.runtime.files import check_can_create
from headsteer.runtime.gated_vit import GatedViT, checkpoint_load_failure, resolve_blocks

DEFAULT_TIMM_NAME = "vit_tiny_patch16_224"


def digits_vit_kwargs(num_classes: int = 10, image_size: int = 16, **overrides) -> dict:
    """The small from-scratch ViT the digits demo uses: 6 heads per block as in the paper.

    16x16 inputs (the 8x8 digits upsampled), 4x4 patches -> 16 patch tokens + a class token,
    width 72 (head size 12), 4 blocks, MLP ratio 2: ~175k parameters, seconds per epoch on a CPU."""
    kwargs = dict(
        img_size=image_size,
        patch_size=4,
        embed_dim=72,
        depth=4,
        num_heads=6,
        mlp_ratio=2.0,
        num_classes=num_classes,
    )
    kwargs.update(overrides)
    return kwargs


# -- shared helpers --------------------------------------------------------------------------------
def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[0, 1] images -> model input, with the per-channel mean/std the bundle records."""
    m = torch.as_tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by a random integer offset in [-max_shift, max_shift]^2 (zero fill)."""
    if max_shift <= 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=generator)
    out = torch.empty_like(images)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        out[i] = padded[i, :, dy : dy + height, dx : dx + width]
    return out


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate_model(
    model: GatedViT,
    dataset: ImageDataset,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 256,
    backend: str = "reference",
) -> dict:
    """Accuracy, head usage and per-block usage of `model` (eval mode, unsteered) on `dataset`."""
    was_training = model.training
    model.eval()
    correct, masks = 0, []
    for images, labels in dataset.batches(batch_size):
        out = model(normalize(images, mean, std), backend=backend)
        correct += int((out.logits.argmax(-1) == labels).sum())
        masks.append(out.head_mask.float())
    model.train(was_training)
    mask = torch.cat(masks) if masks else torch.zeros(0, 0, model.num_heads)
    result = dict(accuracy=correct / max(1, len(dataset)))
    if mask.shape[1]:
        result.update(head_usage=float(mask.mean()), block_usage=[float(v) for v in mask.mean(dim=(0, 2))])
    return result


def _progress(iterable, enabled: bool, **kwargs):
    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, leave=False, **kwargs)


def rebuild(
    model: GatedViT,
    *,
    gate_blocks: Union[str, Sequence[int], None] = None,
    sae_blocks: Union[str, Sequence[int], None] = None,
    sae_width: Optional[int] = None,
    sae_activation: Optional[str] = None,
    sae_k: Optional[int] = None,
    gate_init_bias: Optional[float] = None,
) -> GatedViT:
    """A new GatedViT over the same timm architecture with other gate/SAE sites, carrying over
    every weight whose name and shape still match (backbone, surviving gates and SAEs); new gates
    start at `gate_init_bias` (default: the model's)."""
    config = model.config()
    name, timm_kwargs = config.pop("timm_name"), config.pop("timm_kwargs")
    if name is None:
        raise BundleError("cannot rebuild a GatedViT that was not built from a timm model name")
    if gate_blocks is not None:
        config["gate_blocks"] = gate_blocks
    if sae_blocks is not None:
        config["sae_blocks"] = sae_blocks
    if sae_width is not None:
        config["sae_width"] = sae_width
    if sae_activation is not None:
        config["sae_activation"] = sae_activation
        if sae_activation != "topk" and sae_k is None:
            config["sae_k"] = None
    if sae_k is not None:
        config["sae_k"] = sae_k
    if gate_init_bias is not None:
        config["gate_init_bias"] = gate_init_bias
    fresh = GatedViT.from_timm(name, timm_kwargs=timm_kwargs, **config)
    old_state = model.state_dict()
    new_state = fresh.state_dict()
    for key, tensor in old_state.items():
        if key in new_state and new_state[key].shape == tensor.shape:
            new_state[key] = tensor.detach().clone()
    fresh.load_state_dict(new_state)
    return fresh


# -- backbone ------------------------------------------------------------------------------------
@dataclass
class BackboneConfig:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 3
    label_smoothing: float = 0.1
    max_shift: int = 2
    seed: int = 0


def new_backbone(
    timm_name: str = DEFAULT_TIMM_NAME,
    timm_kwargs: Optional[dict] = None,
    pretrained_file: Optional[str] = None,
    seed: int = 0,
) -> GatedViT:
    """A dense GatedViT (no gates, no SAEs) over a freshly built (seeded) or checkpointed timm ViT.

    A checkpoint that does not load into that architecture is an InputError naming both, and so is an
    image size that is not a whole number of patches per side (timm would crop it; see patch_grid_problem)."""
    torch.manual_seed(seed)
    timm_kwargs = timm_kwargs if timm_kwargs is not None else digits_vit_kwargs()
    try:
        model = GatedViT.from_timm(
            timm_name, timm_kwargs=timm_kwargs, gate_blocks="none", sae_blocks="none", pretrained_file=pretrained_file
        )
    except HeadsteerError:
        raise
    except Exception as error:  # torch, timm and safetensors each raise their own types for a bad file
        if pretrained_file is None:
            raise
        reason = unreadable_checkpoint_reason(error)
        if reason is not None:
            raise InputError(f"cannot load {pretrained_file}: not a checkpoint headsteer reads ({reason}); expected "
                             f"{CHECKPOINT_FORMATS}") from None
        lines = [line.strip() for line in str(error).strip().splitlines()]
        detail = " ".join(lines[:3]) + (f" ... ({len(lines) - 3} more lines)" if len(lines) > 3 else "")
        raise InputError(f"{checkpoint_load_failure(pretrained_file, timm_name, timm_kwargs)}: {detail}") from None
    embed = model.vit.patch_embed
    problem = patch_grid_problem(tuple(embed.img_size), tuple(embed.patch_size), getattr(embed, "dynamic_img_pad", False))
    if problem:
        raise InputError(f"timm {timm_name}: image size {tuple(embed.img_size)} is not a multiple of the patch size "
                         f"{tuple(embed.patch_size)}: {problem}, or timm_kwargs dynamic_img_size=True, "
                         "dynamic_img_pad=True to pad the images instead")
    return model


def patch_grid_problem(image_size, patch_size, dynamic_img_pad: bool = False) -> Optional[str]:
    """What is wrong with an image size (int or (height, width)) that is not a whole number of
    patches on each side, else None: timm floors the patch grid, so the last pixels of every image
    would be dropped. With dynamic_img_pad timm pads the images instead, which is fine."""
    image, patch = to_2tuple(image_size), to_2tuple(patch_size)
    if dynamic_img_pad or all(side % step == 0 for side, step in zip(image, patch)):
        return None
    fit = tuple(-(-side // step) * step for side, step in zip(image, patch))
    fit = fit[0] if fit[0] == fit[1] and not isinstance(image_size, (tuple, list)) else fit
    return (f"timm would crop every image to {tuple(side - side % step for side, step in zip(image, patch))} "
            f"pixels; use a multiple (e.g. {fit})")


# What timm's checkpoint reader (timm.models.load_state_dict) takes: safetensors by the file's suffix,
# anything else through torch.load(weights_only=True), unwrapping a 'state_dict'/'model' entry.
CHECKPOINT_FORMATS = ("a .safetensors file, or a state dict of tensors saved with torch.save (also under a "
                      "'state_dict' or 'model' key); other pickled objects are never unpickled")


def unreadable_checkpoint_reason(error: BaseException) -> Optional[str]:
    """A short reason if `error` (raised while timm read a checkpoint file) says the file is no
    checkpoint at all: not a pickle or zip torch.load reads with weights_only, holding objects other
    than tensors, truncated, or a bad safetensors file. None for any other error (e.g. a checkpoint
    of another architecture). torch's own text tells the user to retry with weights_only=False,
    which headsteer never does, so only the innermost line of it is kept."""
    import pickle

    chain, seen = [], error
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    unpickling = [e for e in chain if isinstance(e, pickle.UnpicklingError)]
    if unpickling:
        first = str(unpickling[-1]).strip().splitlines()[0] if str(unpickling[-1]).strip() else ""
        first = first.split(". ")[0].rstrip(".")  # (torch goes on to advise allowlisting the global)
        return f"torch.load: {first[:160]}" if first else "torch.load cannot read it"
    for e in chain:
        if type(e).__name__ == "SafetensorError":
            return f"safetensors: {str(e).strip()[:160]}"
        if isinstance(e, EOFError):
            return "the file is empty or ends early"
        text = str(e)
        if isinstance(e, RuntimeError) and ("PytorchStreamReader" in text or "Invalid magic number" in text):
            return "torch.load: " + text.strip().splitlines()[0].split(". ")[0].rstrip(".")[:160]
    return None


def train_backbone(
    model: GatedViT,
    splits: Splits,
    config: BackboneConfig = BackboneConfig(),
    progress: bool = True,
) -> tuple[GatedViT, dict]:
    """Train every weight of `model` with cross-entropy (gates, if any, stay as they are and are
    not used: the dense path). Returns the model (eval mode) and a history dict."""
    _check_classes(model, splits)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    params = [p for n, p in model.vit.named_parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [dict(params=decay, weight_decay=config.weight_decay), dict(params=no_decay, weight_decay=0.0)], lr=config.lr
    )
    steps_per_epoch = math.ceil(len(splits.train) / config.batch_size)
    total = config.epochs * steps_per_epoch
    warmup = config.warmup_epochs * steps_per_epoch
    history, step, start = [], 0, time.perf_counter()
    model.train()
    bar = _progress(range(config.epochs), progress, desc="backbone", unit="epoch")
    for epoch in bar:
        running, seen = 0.0, 0
        for images, labels in splits.train.batches(config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, config.lr, warmup)
            x = normalize(random_shift(images, config.max_shift, generator), splits.mean, splits.std)
            logits = model.vit(x)
            loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item() * len(labels)
            seen += len(labels)
            step += 1
        history.append(dict(epoch=epoch, loss=running / max(1, seen)))
        bar.set_postfix(loss=f"{running / max(1, seen):.3f}")
    model.eval()
    val = _dense_accuracy(model, splits.val, splits.mean, splits.std)
    return model, dict(
        recipe="backbone",
        config=asdict(config),
        loss=[h["loss"] for h in history],
        val_accuracy=val,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def _dense_accuracy(model: GatedViT, dataset: ImageDataset, mean, std, batch_size: int = 256) -> float:
    """Accuracy of the timm model itself (every head, no gates)."""
    was = model.training
    model.eval()
    correct = 0
    for images, labels in dataset.batches(batch_size):
        correct += int((model.vit(normalize(images, mean, std)).argmax(-1) == labels).sum())
    model.train(was)
    return correct / max(1, len(dataset))


def _check_classes(model: GatedViT, splits: Splits, class_names: Optional[Sequence[str]] = None) -> None:
    """The model fits the data: as many outputs as classes, its image size, and (given the class
    names a bundle recorded) the same classes in the same order."""
    classes = model.vit.num_classes
    if classes != len(splits.class_names):
        raise InputError(f"the model has {classes} outputs but the data has {len(splits.class_names)} classes")
    if tuple(model.image_size) != splits.image_size:
        raise InputError(f"the model takes {model.image_size} images but the data is {splits.image_size} pixels")
    if class_names is not None and list(class_names) != list(splits.class_names):
        index = next(i for i, (a, b) in enumerate(zip(class_names, splits.class_names)) if a != b)
        raise InputError(
            f"the bundle's class {index} is {class_names[index]!r} but the data's is {splits.class_names[index]!r}; "
            "continue a bundle on the data it was trained on (same classes in the same order)"
        )


# -- gates ---------------------------------------------------------------------------------------
@dataclass
class GateConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    backbone_lr: float = 5e-4
    weight_decay: float = 0.05
    target_usage: float = 0.72
    usage_weight: float = 2.0
    temperature: float = 5.0
    freeze_backbone: bool = False
    usage_granularity: str = "block"  # "block": mean_l |usage_l - target|; "model": |usage - target|
    # Gumbel noise scale: 1 for the first `anneal_start` of training, then linearly down to 0, so
    # the gates end decisive and the usage trained for is the usage thresholding gives at inference.
    anneal_start: float = 0.5
    max_shift: int = 2
    label_smoothing: float = 0.1
    seed: int = 0


def usage_loss(head_weight: torch.Tensor, target: float, granularity: str = "block") -> torch.Tensor:
    """`|mean(head_weight) - target|` over the whole model ("model", AdaViT's form) or averaged over
    gated blocks, each block's own usage pulled toward the target ("block")."""
    if granularity == "model":
        return (head_weight.mean() - target).abs()
    if granularity == "block":
        return (head_weight.mean(dim=(0, 2)) - target).abs().mean()
    raise InputError(f"usage_granularity must be 'block' or 'model', got {granularity!r}")


def noise_schedule(epoch: int, epochs: int, anneal_start: float) -> float:
    """1 until `anneal_start` of training, then linear to 0 at the last epoch."""
    begin = int(round(anneal_start * epochs))
    if epoch < begin or epochs <= 1:
        return 1.0
    return max(0.0, 1.0 - (epoch - begin + 1) / max(1, epochs - begin))


def add_gates(model: GatedViT, gate_blocks: Union[str, Sequence[int]] = "all", gate_init_bias: float = 3.0,
              seed: Optional[int] = None) -> GatedViT:
    """`model` gated at exactly `gate_blocks`, no SAE: gates it already has at those blocks keep
    their weights, gates at other blocks are dropped (as `rebuild` does); new gates' output
    bias starts at `gate_init_bias` (3.0: sigmoid 0.95, nearly every head kept). With `seed` the
    new gates are drawn from it (as train_sae draws new SAEs from its config's seed), not from
    the global RNG as earlier work left it."""
    if model.gate_blocks and gate_blocks == "all" and len(model.gate_blocks) == len(model.vit.blocks):
        return model
    if seed is not None:
        torch.manual_seed(seed)
    return rebuild(model, gate_blocks=gate_blocks, sae_blocks="none", gate_init_bias=gate_init_bias)


def train_gates(
    model: GatedViT,
    splits: Splits,
    config: GateConfig = GateConfig(),
    progress: bool = True,
) -> tuple[GatedViT, dict]:
    """AdaViT-style gate training: cross-entropy + `usage_weight * usage_loss(head_weight)`, by
    default (`usage_granularity="block"`) the mean over gated blocks of `|block usage - target|`;
    "model" is AdaViT's `|mean(head_weight) - target|` over the whole model.

    head_weight is the straight-through Gumbel-sigmoid mask over every gated head of the batch.
    With `freeze_backbone` only the gates learn; otherwise the backbone is fine-tuned at
    `backbone_lr`. SAEs (if any) are untouched: unsteered, they do not change the gate input."""
    _check_classes(model, splits)
    if not model.gate_blocks:
        raise InputError("the model has no gated blocks; add gates first (add_gates)")
    if not 0.0 < config.target_usage <= 1.0:
        raise InputError(f"target_usage must be in (0, 1], got {config.target_usage}")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    gates = list(model.gates.values())
    for gate in gates:
        gate.temperature = config.temperature
    for p in model.saes.parameters():
        p.requires_grad_(False)
    groups = [dict(params=list(model.gates.parameters()), lr=config.lr, base_lr=config.lr, weight_decay=0.0)]
    for p in model.vit.parameters():
        p.requires_grad_(not config.freeze_backbone)
    if not config.freeze_backbone:
        groups.append(
            dict(params=list(model.vit.parameters()), lr=config.backbone_lr, base_lr=config.backbone_lr,
                 weight_decay=config.weight_decay)
        )
    optimizer = torch.optim.AdamW(groups)
    steps_per_epoch = math.ceil(len(splits.train) / config.batch_size)
    total, warmup = config.epochs * steps_per_epoch, steps_per_epoch
    history, step, start = [], 0, time.perf_counter()
    model.train()
    if config.freeze_backbone:
        model.vit.eval()  # frozen: no dropout / drop-path noise in the backbone
    bar = _progress(range(config.epochs), progress, desc="gates", unit="epoch")
    for epoch in bar:
        sums = dict(loss=0.0, ce=0.0, usage=0.0)
        seen = 0
        for gate in gates:
            gate.noise_scale = noise_schedule(epoch, config.epochs, config.anneal_start)
        for images, labels in splits.train.batches(config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, total, group["base_lr"], warmup)
            x = normalize(random_shift(images, config.max_shift, generator), splits.mean, splits.std)
            out = model(x)
            ce = F.cross_entropy(out.logits, labels, label_smoothing=config.label_smoothing)
            usage = out.head_weight.mean()
            loss = ce + config.usage_weight * usage_loss(out.head_weight, config.target_usage, config.usage_granularity)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = len(labels)
            sums["loss"] += loss.item() * n
            sums["ce"] += ce.item() * n
            sums["usage"] += usage.item() * n
            seen += n
            step += 1
        epoch_stats = {k: v / max(1, seen) for k, v in sums.items()}
        history.append(epoch_stats)
        bar.set_postfix(ce=f"{epoch_stats['ce']:.3f}", usage=f"{epoch_stats['usage']:.2f}")
    for gate in gates:  # full Gumbel noise again for any later training
        gate.noise_scale = 1.0
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    val = evaluate_model(model, splits.val, splits.mean, splits.std)
    return model, dict(
        recipe="gates",
        config=asdict(config),
        loss=[h["loss"] for h in history],
        train_usage=[h["usage"] for h in history],
        val_accuracy=val["accuracy"],
        val_head_usage=val["head_usage"],
        val_block_usage=val["block_usage"],
        seconds=time.perf_counter() - start,
    )


# -- SAE -----------------------------------------------------------------------------------------
TRAINED_SAE_ACTIVATIONS = ("topk", "relu")


@dataclass
class SAEConfig:
    width: Optional[int] = None  # default: 4 x model width
    activation: str = "topk"  # "topk" or "relu" (JumpReLU SAEs run, but are not trained here)
    k: int = 8
    l1: float = 1e-3  # sparsity penalty for relu SAEs (TopK needs none)
    epochs: int = 300
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


@torch.no_grad()
def decision_vectors(
    model: GatedViT,
    dataset: ImageDataset,
    mean: Sequence[float],
    std: Sequence[float],
    blocks: Sequence[int],
    batch_size: int = 256,
) -> dict[int, torch.Tensor]:
    """The decision vectors e [N, D] entering each of `blocks` for every image of `dataset`,
    from the unsteered model in eval mode (read by a forward pre-hook on each block's norm1,
    whose input is the residual stream entering that block)."""
    from headsteer.kernels.reference import decision_vector

    vit = model.vit
    has_cls = getattr(vit, "cls_token", None) is not None
    captured: dict[int, list] = {b: [] for b in blocks}
    hooks = []
    for b in blocks:
        def hook(module, inputs, b=b):
            captured[b].append(decision_vector(inputs[0], vit.num_prefix_tokens, has_cls).detach().clone())
        hooks.append(vit.blocks[b].norm1.register_forward_pre_hook(hook))
    was = model.training
    model.eval()
    try:
        for images, _ in dataset.batches(batch_size):
            model(normalize(images, mean, std))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {b: torch.cat(v) if v else torch.zeros(0, model.embed_dim) for b, v in captured.items()}


def check_trainable_sae(activation: str, width: Optional[int] = None) -> None:
    """Refuse an SAE this module cannot train: JumpReLU (its threshold needs a straight-through
    estimator and an L0 loss, not implemented) or a width below 1."""
    if activation == "jumprelu":
        raise InputError(
            "JumpReLU SAEs are supported for inference (a bundle that has one loads and runs) but cannot be "
            f"trained here; train a {' or '.join(TRAINED_SAE_ACTIVATIONS)} SAE"
        )
    if activation not in TRAINED_SAE_ACTIVATIONS:
        raise InputError(f"SAE activation must be one of {TRAINED_SAE_ACTIVATIONS}, got {activation!r}")
    if width is not None and width < 1:
        raise InputError(f"SAE width must be at least 1, got {width}")


def sae_width(model: GatedViT, width: Optional[int] = None) -> int:
    """The width of the SAEs `train_sae` puts on `model`: `width`, by default 4 x the model's width."""
    return width or 4 * model.embed_dim


def _fast_encode(sae, e: torch.Tensor) -> torch.Tensor:
    """SAE encode for training (TopK or ReLU): torch.topk instead of the reference rank-count
    (same result up to exact ties), differentiable."""
    pre = (e - sae.decoder_bias) @ sae.encoder_weight.t() + sae.encoder_bias
    if sae.activation == "topk":
        values, index = pre.topk(sae.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, index, F.relu(values))
    return F.relu(pre)


@torch.no_grad()
def sae_metrics(sae, e: torch.Tensor) -> dict:
    """Reconstruction fraction of variance explained, mean L0 and dead-latent fraction on e [N, D]
    (a latent is dead when it is zero on every vector)."""
    x_hat, z = sae(e)
    residual = ((e - x_hat) ** 2).sum()
    variance = ((e - e.mean(0, keepdim=True)) ** 2).sum()
    active = z != 0
    # A decision vector that does not vary (e.g. the class token entering block 0, before any
    # attention has mixed in the image) has no variance to explain: FVE is undefined (None).
    constant = float(variance) <= 1e-10 * float((e**2).sum()) + 1e-12
    return dict(
        fve=None if constant else float(1.0 - residual / variance),
        l0=float(active.float().sum(1).mean()),
        dead_fraction=float((~active.any(0)).float().mean()),
    )


def train_sae_on(sae, e_train: torch.Tensor, config: SAEConfig, progress: bool = True, desc: str = "sae") -> list:
    """Fit `sae` to decision vectors e_train [N, D] (MSE, + L1 for non-TopK), decoder rows kept at
    unit norm; latents dead for ten epochs are re-initialised toward badly reconstructed vectors.

    Training runs on standardized vectors `(e - mean) / s` (s: RMS distance to the mean), so the
    optimizer sees the same scale whatever the backbone's residual norm; the result is folded back
    into raw-space weights (TopK/ReLU are positively homogeneous: W_enc and W_dec are unchanged,
    b_enc scales by s, b_dec becomes mean + s * b_dec)."""
    check_trainable_sae(sae.activation)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    mu = e_train.mean(0)
    s = ((e_train - mu) ** 2).sum(-1).mean().sqrt().clamp_min(1e-12)
    data = (e_train - mu) / s
    with torch.no_grad():
        sae.normalize_decoder_()
        sae.decoder_bias.zero_()
        sae.encoder_weight.copy_(sae.decoder_weight)
        sae.encoder_bias.zero_()
    params = [sae.encoder_weight, sae.encoder_bias, sae.decoder_weight, sae.decoder_bias]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    n = data.shape[0]
    losses = []
    bar = _progress(range(config.epochs), progress, desc=desc, unit="epoch")
    fired = torch.zeros(sae.width, dtype=torch.bool)
    for epoch in bar:
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, config.batch_size):
            e = data[order[start : start + config.batch_size]]
            z = _fast_encode(sae, e)
            x_hat = z @ sae.decoder_weight + sae.decoder_bias
            loss = ((x_hat - e) ** 2).sum(-1).mean()
            if sae.activation != "topk":
                loss = loss + config.l1 * z.abs().sum(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sae.normalize_decoder_()
            fired |= (z != 0).any(0)
            total += loss.item() * e.shape[0]
        losses.append(total / n)
        bar.set_postfix(mse=f"{losses[-1]:.4f}")
        if epoch % 10 == 9:
            dead = (~fired).nonzero().squeeze(1)
            # resample dead latents (not in the last fifth, so they settle before the end)
            if len(dead) and epoch < int(config.epochs * 0.8):
                with torch.no_grad():
                    x_hat = _fast_encode(sae, data) @ sae.decoder_weight + sae.decoder_bias
                    err = ((data - x_hat) ** 2).sum(-1)
                    pick = torch.multinomial(err + 1e-12, len(dead), replacement=len(dead) > n, generator=generator)
                    direction = F.normalize(data[pick] - sae.decoder_bias, dim=1)
                    sae.decoder_weight[dead] = direction
                    sae.encoder_weight[dead] = direction
                    sae.encoder_bias[dead] = 0.0
                optimizer.state.clear()
            fired = torch.zeros(sae.width, dtype=torch.bool)
    with torch.no_grad():  # fold the standardization back into raw-space weights
        sae.encoder_bias.mul_(s)
        sae.decoder_bias.copy_(mu + s * sae.decoder_bias)
    return [loss * float(s) ** 2 for loss in losses]


def train_sae(
    model: GatedViT,
    splits: Splits,
    sae_blocks: Union[str, Sequence[int]] = (-1,),
    config: SAEConfig = SAEConfig(),
    progress: bool = True,
) -> tuple[GatedViT, dict]:
    """Put SAEs at `sae_blocks` (they must be gated) and fit each to the decision vectors of the
    frozen model at that block on the train split. Returns the model and per-site validation
    metrics {block: {fve, l0, dead_fraction}} plus their mean."""
    check_trainable_sae(config.activation, config.width)
    _check_classes(model, splits)
    start = time.perf_counter()
    width = sae_width(model, config.width)
    torch.manual_seed(config.seed)  # the new SAEs are drawn here
    model = rebuild(model, sae_blocks=sae_blocks, sae_width=width, sae_activation=config.activation,
                    sae_k=config.k if config.activation == "topk" else None)
    model.eval()
    e_train = decision_vectors(model, splits.train, splits.mean, splits.std, model.sae_blocks)
    e_val = decision_vectors(model, splits.val, splits.mean, splits.std, model.sae_blocks)
    sites = {}
    for block in model.sae_blocks:
        sae = model.saes[str(block)]
        with torch.enable_grad():
            losses = train_sae_on(sae, e_train[block], config, progress, desc=f"sae block {block}")
        sites[str(block)] = dict(sae_metrics(sae, e_val[block]), loss=losses[-1] if losses else None)
    mean_metrics = {}
    for key in ("fve", "l0", "dead_fraction"):
        values = [s[key] for s in sites.values() if s[key] is not None]
        mean_metrics[key] = sum(values) / len(values) if values else None
    return model, dict(
        recipe="sae",
        config=asdict(config) | dict(width=width),
        sae_blocks=list(model.sae_blocks),
        sites=sites,
        val=mean_metrics,
        seconds=time.perf_counter() - start,
    )


# -- bundle plumbing -------------------------------------------------------------------------------
def load_model(path: Union[str, Path]) -> tuple[GatedViT, dict, list]:
    """(model, extra, class names) of a bundle, for continuing training."""
    model, info = load_bundle(path)
    return model, dict(info.extra or {}), list(info.class_names)


def check_bundle_out(path: Union[str, Path], what: str = "--out") -> Path:
    """Refuse a bundle destination that saving must not replace. It may be a new path, an empty
    folder or an existing bundle holding only bundle files (replaced); a file, a folder holding
    anything else, the current folder or one above it (saving replaces the whole folder) are left
    alone and refused, as is a parent folder that cannot be created or written in."""
    path = Path(path)
    absolute, cwd = Path(os.path.abspath(path)), Path(os.path.abspath(os.getcwd()))
    if absolute == cwd or absolute in cwd.parents:
        raise InputError(f"{what} {path} is the current folder or one above it; saving a bundle replaces its "
                         "whole folder: give a path below the current folder")
    check_replaceable(path, True, what)
    check_can_create(path, what)
    return path


def save_stage(model: GatedViT, path, splits: Splits, extra: dict, steering=None, overwrite: bool = True) -> Path:
    """Save a recipe's bundle; with `overwrite` only a bundle or an empty folder is replaced."""
    if overwrite:
        check_bundle_out(path, "bundle path")
    return save_bundle(
        model, path, class_names=splits.class_names, steering=steering, mean=splits.mean, std=splits.std,
        extra=extra, overwrite=overwrite,
    )


def _record(extra: dict, stage: dict) -> dict:
    extra = dict(extra)
    stages = list(extra.get("stages", []))
    stages.append(stage)
    extra["stages"] = stages
    return extra


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# -- CLI -----------------------------------------------------------------------------------------
# `train backbone` architecture options -> timm kwargs; from scratch they default to the digits ViT,
# with --pretrained-file to the timm model's own.
ARCHITECTURE_OPTIONS = dict(image_size="img_size", patch_size="patch_size", embed_dim="embed_dim", depth="depth",
                            num_heads="num_heads", mlp_ratio="mlp_ratio")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="recipe", metavar="RECIPE", required=True)

    def common(p, needs_from: bool, trains: bool = True, lr_help: Optional[str] = None):
        p.add_argument("--data", default="digits", help="digits, cifar100:PATH or imagefolder:PATH (default digits)")
        p.add_argument("--out", required=True,
                       help="bundle directory to write: a new path, an empty folder or a bundle (replaced)")
        if needs_from:
            p.add_argument("--from", dest="from_bundle", required=True, help="bundle to start from")
        p.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and random draws")
        p.add_argument("--split-seed", type=int, default=None,
                       help="seed of the train/val/test split (default: the one the --from bundle recorded; for a "
                            "bundle that records none, its first stage's seed, else --seed); a continued bundle "
                            "keeps its recorded split, so another value is refused")
        if trains:
            p.add_argument("--epochs", type=int, default=None)
            p.add_argument("--lr", type=float, default=None, help=lr_help)
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")

    p = sub.add_parser(
        "backbone", help="train a small timm ViT from scratch, a local checkpoint, or a bundle",
        description="From scratch the architecture options default to the digits ViT (16 px, patch 4, width 72, "
                    "depth 4, 6 heads, MLP ratio 2); with --pretrained-file to the timm model's own; with --from "
                    "they are the bundle's and cannot be given.",
    )
    common(p, needs_from=False)
    p.add_argument("--from", dest="from_bundle", default=None, help="continue from this bundle's backbone")
    p.add_argument("--timm-name", default=None, help=f"timm model name (default {DEFAULT_TIMM_NAME})")
    p.add_argument("--pretrained-file", default=None, help="local timm checkpoint (nothing is downloaded)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--embed-dim", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--num-heads", type=int, default=None)
    p.add_argument("--mlp-ratio", type=float, default=None)

    p = sub.add_parser("gates", help="AdaViT-style head gates on every block (a gated bundle keeps its own), "
                                     "with a usage loss")
    common(p, needs_from=True,
           lr_help=f"learning rate of the gates only (default {GateConfig.lr}); the backbone is fine-tuned at "
                   f"{GateConfig.backbone_lr} unless --freeze-backbone")
    p.add_argument("--target-usage", type=float, default=GateConfig.target_usage)
    p.add_argument("--usage-weight", type=float, default=GateConfig.usage_weight)
    p.add_argument("--freeze-backbone", action="store_true", help="train only the gates")

    p = sub.add_parser("sae", help="SAE(s) on the decision vector entering the last (or every) block")
    common(p, needs_from=True)
    p.add_argument("--sae-blocks", default="-1", help="'-1' (the paper's last block), 'all', or indices '0,3'")
    p.add_argument("--width", type=int, default=None, help="latents per SAE (default 4 x the model's width)")
    p.add_argument("--k", type=int, default=SAEConfig.k, help="active latents of a topk SAE")
    p.add_argument("--activation", default="topk", choices=["topk", "relu", "jumprelu"],
                   help="topk or relu (JumpReLU SAEs load and run, but are not trained here)")

    p = sub.add_parser("steering", help="choose per-class steering rows on the validation split")
    common(p, needs_from=True, trains=False)


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_args(args: argparse.Namespace) -> None:
    """Reject unusable training arguments before any data or model is loaded."""
    for name in ("lr", "mlp_ratio", "target_usage", "usage_weight"):  # argparse's float() takes nan and inf
        value = getattr(args, name, None)
        if value is not None and not math.isfinite(value):
            raise InputError(f"{_option(name)} must be a finite number, got {value}")
    for name in ("epochs", "lr"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise InputError(f"--{name} must be positive, got {value}")
    check_seed(args.seed, "--seed")  # (with --from it seeds training only, but the same range)
    if args.split_seed is not None:  # (load_data would refuse it too, but as "seed", after probing a checkpoint)
        check_seed(args.split_seed, "--split-seed")
    check_bundle_out(args.out)
    if args.recipe == "backbone":
        _check_backbone_args(args)
    elif args.recipe == "gates":
        if not 0.0 < args.target_usage <= 1.0:
            raise InputError(f"--target-usage must be in (0, 1], got {args.target_usage}")
        if args.usage_weight < 0:
            raise InputError(f"--usage-weight must be >= 0, got {args.usage_weight}")
    elif args.recipe == "sae":
        check_trainable_sae(args.activation, args.width)
        if args.activation == "topk" and args.k < 1:
            raise InputError(f"--k must be at least 1, got {args.k}")


def _check_backbone_args(args: argparse.Namespace) -> None:
    given = [name for name in ("timm_name", "pretrained_file", *ARCHITECTURE_OPTIONS) if getattr(args, name) is not None]
    if args.from_bundle:
        if given:
            raise InputError(f"--from {args.from_bundle} continues that bundle's model, so "
                             f"{', '.join(map(_option, given))} cannot change it; leave them out, or drop --from")
        return
    for name in ARCHITECTURE_OPTIONS:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise InputError(f"{_option(name)} must be positive, got {value}")
    if args.pretrained_file and not Path(args.pretrained_file).is_file():
        raise InputError(f"--pretrained-file {args.pretrained_file} does not exist")
    kwargs = _backbone_kwargs(args, num_classes=0)
    dim, heads = kwargs.get("embed_dim"), kwargs.get("num_heads")
    if dim is not None and heads is not None and dim % heads:
        raise InputError(f"--embed-dim {dim} is not divisible by --num-heads {heads}")
    image, patch = kwargs.get("img_size"), kwargs.get("patch_size")
    if image is not None and patch is not None and patch > image:
        raise InputError(f"--patch-size {patch} is larger than --image-size {image}")
    # (with --pretrained-file and no --patch-size the patch size is the timm model's own: new_backbone
    # checks it when the checkpoint is probed, still before any data is loaded)
    problem = patch_grid_problem(image, patch, kwargs.get("dynamic_img_pad", False)) if image and patch else None
    if problem:
        raise InputError(f"--image-size {image} is not a multiple of --patch-size {patch}: {problem}")


def _backbone_kwargs(args: argparse.Namespace, num_classes: int) -> dict:
    """timm kwargs of a new backbone: from scratch the digits ViT's with the options given over
    them; with --pretrained-file only the options given (the rest are the timm model's own)."""
    given = {key: getattr(args, name) for name, key in ARCHITECTURE_OPTIONS.items() if getattr(args, name) is not None}
    if args.pretrained_file:
        return dict(given, num_classes=num_classes)
    return digits_vit_kwargs(num_classes=num_classes, **given)


def _new_backbone_image_size(args: argparse.Namespace) -> int | tuple[int, int]:
    """The image size of the backbone to train, before the data is loaded. A checkpoint is loaded
    here once, into a model without a head, so one that does not fit is refused before any work."""
    if not args.pretrained_file:
        return _backbone_kwargs(args, num_classes=0)["img_size"]
    probe = new_backbone(args.timm_name or DEFAULT_TIMM_NAME, _backbone_kwargs(args, num_classes=0),
                         args.pretrained_file, seed=args.seed)
    return probe.image_size


def _split_seed(args: argparse.Namespace, extra: dict) -> int:
    """The seed to split the data with when continuing a bundle (`resolve_split_seed`; a bundle
    that records none: --split-seed, else its first stage's seed, else --seed, as recipes split
    before bundles recorded it). Another --split-seed than a recorded one is refused before any
    data is loaded."""
    seed, origin = resolve_split_seed(extra, args.split_seed, "--split-seed", default=args.seed)
    if recorded_split_seed(extra) is None:
        print(f"split seed {seed}: {origin}")
    return seed


def _check_source(args: argparse.Namespace, model: GatedViT) -> None:
    """What a recipe needs of its --from bundle, checked before the data is loaded."""
    if args.recipe == "sae":
        if not model.gate_blocks:
            raise InputError(f"{args.from_bundle} has no head gates; run `headsteer train gates` first")
        blocks = resolve_blocks(args.sae_blocks, len(model.vit.blocks), "--sae-blocks")
        ungated = [block for block in blocks if block not in model.gate_blocks]
        if ungated:
            raise InputError(f"--sae-blocks {args.sae_blocks}: block(s) {ungated} have no head gate (an SAE sits "
                             f"ahead of a gate; gated blocks: {list(model.gate_blocks)})")
        width = sae_width(model, args.width)
        if args.activation == "topk" and args.k > width:
            raise InputError(f"--k {args.k} is larger than the SAE width {width}")
    if args.recipe == "steering" and not model.sae_blocks:
        raise InputError(f"{args.from_bundle} has no SAE; run `headsteer train sae` first")


def _train_recipe(args: argparse.Namespace, model: GatedViT, splits: Splits, progress: bool):
    """Run the recipe on a loaded model and data: (model, stage record, steering table or None)."""
    overrides = {k: getattr(args, k) for k in ("epochs", "lr") if getattr(args, k, None) is not None}
    if args.recipe == "backbone":
        model, stage = train_backbone(model, splits, BackboneConfig(seed=args.seed, **overrides), progress)
        print(f"backbone: val accuracy {stage['val_accuracy']:.4f} ({stage['seconds']:.0f} s)")
    elif args.recipe == "gates":
        config = GateConfig(seed=args.seed, target_usage=args.target_usage, usage_weight=args.usage_weight,
                            freeze_backbone=args.freeze_backbone, **overrides)
        # a gated bundle keeps its gate sites and SAEs; an ungated one gets a gate on every block,
        # drawn from --seed
        model, stage = train_gates(model if model.gate_blocks else add_gates(model, seed=args.seed), splits, config,
                                   progress)
        print(f"gates: val accuracy {stage['val_accuracy']:.4f}, head usage {stage['val_head_usage']:.3f}")
    elif args.recipe == "sae":
        config = SAEConfig(seed=args.seed, width=args.width, k=args.k, activation=args.activation, **overrides)
        model, stage = train_sae(model, splits, args.sae_blocks, config, progress)
        for block, site in stage["sites"].items():
            fve = "undefined (constant input)" if site["fve"] is None else f"{site['fve']:.3f}"
            print(f"sae block {block}: val FVE {fve}, L0 {site['l0']:.1f}, dead {site['dead_fraction']:.3f}")
    elif args.recipe == "steering":
        from headsteer.runtime.steering import fit_steering

        table, stage = fit_steering(model, splits, progress=progress, seed=args.seed)
        return model, stage, table
    else:  # pragma: no cover - argparse restricts the choices
        raise InputError(f"unknown recipe {args.recipe!r}")
    return model, stage, None


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.recipe == "backbone" and not args.from_bundle:
        split_seed = args.split_seed if args.split_seed is not None else args.seed
        splits = load_data(args.data, image_size=_new_backbone_image_size(args), seed=split_seed,
                           progress=not args.no_progress)
        model = new_backbone(args.timm_name or DEFAULT_TIMM_NAME, _backbone_kwargs(args, len(splits.class_names)),
                             args.pretrained_file, seed=args.seed)
        extra = {}
    else:
        model, extra, class_names = load_model(args.from_bundle)
        split_seed = _split_seed(args, extra)
        _check_source(args, model)
        splits = load_data(args.data, image_size=model.image_size, seed=split_seed,
                           progress=not args.no_progress)
        _check_classes(model, splits, class_names)
    model, stage, table = _train_recipe(args, model, splits, progress=not args.no_progress)
    extra = dict(_record(extra, stage), data=data_record(args.data, split_seed))
    save_stage(model, args.out, splits, _json_safe(extra), steering=table)
    if table is not None:
        print(f"steering: {len(table.class_names)} per-class rows written to {args.out}")
    else:
        print(f"wrote {args.out}")
    return 0
