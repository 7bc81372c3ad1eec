"""Tiny real models from torchvision, timm and Hugging Face transformers, and their references.

Every builder returns a :class:`ZooCase`: the model from its package's own
constructor (tiny config, random weights, no download) in float64, the inputs
of one forward pass as the user passes them (``model(**batch)``), the loss the
user writes after it, and the parameters kept trainable. The rest are frozen
so that the dense float64 torch.func reference stays small; the trainable ones
include what makes each model hard: position embeddings, class tokens, layer
scale, attention projections, normalisation, the head.

:func:`exact_reference` builds ``J``, the per-sample loss Hessians and
``G = Σ_n J_nᵀ H_n J_n`` with ``torch.func`` alone (``jacrev`` of
``functional_call``, ``hessian`` of the loss), independently of curvhook.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev


@dataclass
class ZooCase:
    """One real model and how a user trains it.

    Attributes:
        model: The model, float64, with only the chosen parameters requiring grad.
        inputs: Keyword arguments of one forward pass.
        loss: ``loss(logits, criterion) -> scalar``, what the user writes.
        logits: ``logits(model output) -> Tensor`` ``[N, *out]``: the tensor the
            loss is computed from (curvhook infers it; the reference needs it).
    """

    model: nn.Module
    inputs: dict
    loss: Callable[[Tensor, nn.Module], Tensor]
    criterion: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    logits: Callable[[Any], Tensor] = lambda out: out
    rtol: float = 1e-10
    # (module, forward) pairs the torch.func reference runs instead of the modules' own forwards:
    # the same function without a custom autograd.Function, which torch.func cannot transform
    reference_forwards: tuple = ()

    def forward(self) -> Any:
        return self.model(**self.inputs)


def available(*packages: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in packages)


def keep_trainable(model: nn.Module, prefixes: tuple[str, ...]) -> nn.Module:
    """Freeze every parameter whose name starts with none of ``prefixes``."""
    names = [name for name, _ in model.named_parameters()]
    # a prefix that matches nothing (a package renamed its modules) would test less than it says
    unmatched = [prefix for prefix in prefixes if not any(name.startswith(prefix) for name in names)]
    assert not unmatched, f"no parameter of {type(model).__name__} starts with {unmatched}"
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(prefixes))
    return model


def _random_zero_inits(model: nn.Module) -> None:
    """Draw the parameters that start at zero (a branch's last norm weight, a skip gain) from
    U(0.5, 1.5): at zero, nothing before them reaches the loss, and their Jacobians are zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("bias") and p.numel() and not p.any():
                p.uniform_(0.5, 1.5)


def zero_jacobian_parameters(case: "ZooCase", ref: "ExactReference") -> list[str]:
    """The trainable parameters whose reference Jacobian is zero: a test of them compares zeros."""
    names = {id(p): n for n, p in case.model.named_parameters()}
    zero, start = [], 0
    for p in ref.params:
        if not ref.J[..., start:start + p.numel()].any():
            zero.append(names[id(p)])
        start += p.numel()
    return zero


def _classifier(model: nn.Module, key: str, x: Tensor, classes: int, patterns, logits=lambda o: o) -> ZooCase:
    y = torch.randint(0, classes, (x.shape[0],))
    model = keep_trainable(model.double(), patterns)
    x = x.double() if x.is_floating_point() else x
    return ZooCase(model, {key: x}, lambda out, crit: crit(out, y), logits=logits)


def _language_model(model: nn.Module, ids: Tensor, vocab: int, patterns) -> ZooCase:
    """Next-token loss as users write it: ``crit(logits.reshape(-1, V), labels.reshape(-1))``."""
    labels = torch.randint(0, vocab, ids.shape)
    model = keep_trainable(model.double(), patterns)

    def loss(logits: Tensor, crit: nn.Module) -> Tensor:
        return crit(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    return ZooCase(model, {"input_ids": ids}, loss, logits=lambda out: out.logits)


N, CLASSES, VOCAB, LENGTH = 2, 3, 20, 5


def _images(size: int, n: int = N) -> Tensor:
    return torch.randn(n, 3, size, size)


def _ids(n: int = N) -> Tensor:
    return torch.randint(0, VOCAB, (n, LENGTH))


# ------------------------------------------------------------ torchvision
def tv_resnet18(n: int = N) -> ZooCase:
    import torchvision

    model = torchvision.models.resnet18(num_classes=CLASSES).eval()
    return _classifier(model, "x", _images(16, n), CLASSES, ("bn1.", "layer1.0.bn1.", "layer4.1.bn2.", "fc."))


def tv_mobilenet_v3_small(n: int = N) -> ZooCase:
    import torchvision

    model = torchvision.models.mobilenet_v3_small(num_classes=CLASSES).eval()
    return _classifier(model, "x", _images(16, n), CLASSES, ("features.0.", "features.1.block.1.", "classifier.3."))


def tv_convnext_tiny(n: int = N) -> ZooCase:
    import torchvision

    model = torchvision.models.convnext_tiny(num_classes=CLASSES).eval()
    patterns = ("features.0.1.", "features.7.2.layer_scale", "features.7.2.block.2.", "classifier.")
    return _classifier(model, "x", _images(32, n), CLASSES, patterns)


def tv_vit(n: int = N) -> ZooCase:
    import torchvision

    model = torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=CLASSES
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)  # zero at init: nothing before the head would reach the loss
    return _classifier(model, "x", _images(16, n), CLASSES, ("class_token", "encoder.pos_embedding", "conv_proj.", "encoder.layers.encoder_layer_0.ln_1.", "encoder.layers.encoder_layer_0.self_attention.", "heads."))


def tv_swin_v2(n: int = N) -> ZooCase:
    """Swin V2 blocks: window attention merges the batch axis with the windows
    (``[N·nW, L, C]``) and zeroes a slice of a cloned bias in place."""
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    model = SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2],
        stochastic_depth_prob=0.0, num_classes=CLASSES, block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2,
    ).eval()
    patterns = ("features.1.0.attn.", "features.1.0.norm1.", "features.3.0.attn.qkv.", "head.")
    return _classifier(model, "x", _images(16, n), CLASSES, patterns)


def tv_swin(n: int = N) -> ZooCase:
    """Swin V1 blocks: ``ShiftedWindowAttention`` has children (``qkv``, ``proj``) it never calls
    (``F.linear`` with their weights), shifted windows by ``torch.roll``."""
    from torchvision.models.swin_transformer import SwinTransformer

    model = SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[2, 1], num_heads=[2, 2], window_size=[2, 2],
        stochastic_depth_prob=0.0, num_classes=CLASSES,
    ).eval()
    patterns = ("features.1.1.attn.", "features.1.0.norm1.", "features.3.0.attn.qkv.", "head.")
    return _classifier(model, "x", _images(16, n), CLASSES, patterns)


# ------------------------------------------------------------------- timm
def timm_vit_tiny(n: int = N) -> ZooCase:
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=CLASSES, embed_dim=16, num_heads=2)
    return _classifier(model, "x", _images(32, n), CLASSES, ("cls_token", "pos_embed", "patch_embed.proj.bias", "blocks.0.attn.", "blocks.0.norm1.", "head."))


def timm_mobilevitv2(n: int = N) -> ZooCase:
    import timm

    model = timm.create_model("mobilevitv2_050", num_classes=CLASSES).eval()
    return _classifier(model, "x", _images(64, n), CLASSES, ("stem.", "stages.4.1.conv_kxk.", "head."))


def timm_convnext_atto(n: int = N) -> ZooCase:
    import timm

    model = timm.create_model("convnext_atto", num_classes=CLASSES)
    return _classifier(model, "x", _images(32, n), CLASSES, ("stem.1.", "stages.3.blocks.1.gamma", "stages.3.blocks.1.norm.", "head."))


def timm_resnet10t(n: int = N) -> ZooCase:
    import timm

    model = timm.create_model("resnet10t", num_classes=CLASSES).eval()
    return _classifier(model, "x", _images(16, n), CLASSES, ("conv1.0.", "bn1.", "layer4.0.bn2.", "fc."))


def timm_levit(n: int = N) -> ZooCase:
    """``BatchNorm1d`` (eval) on ``x.flatten(0, 1)``: the batch axis merged with the tokens
    inside timm's ``LinearNorm``, learned attention biases indexed by position."""
    import timm

    model = timm.create_model("levit_128s", img_size=32, num_classes=CLASSES).eval()
    _random_zero_inits(model)  # the branches' last BatchNorm weights start at zero
    for m in model.modules():
        if hasattr(m, "attention_bias_cache"):
            # In eval mode timm indexes the biases once and keeps the result (a constant after
            # the first forward pass: no gradient reaches them); computed on every call, as in
            # train mode, they are trainable.
            m.get_attention_biases = lambda device, m=m: m.attention_biases[:, m.attention_bias_idxs]
    patterns = ("stages.0.blocks.0.attn.attention_biases", "stages.0.blocks.0.attn.qkv.bn.", "head.bn.", "head.linear.")
    return _classifier(model, "x", _images(32, n), CLASSES, patterns)


def timm_maxvit(n: int = N) -> ZooCase:
    """MaxViT (a tiny config of timm's ``MaxxVit``): block and grid window attention on windows
    merged with the batch (``[N·windows, L, C]``), a relative-position MLP on a coordinate
    table (``rel_pos_type="mlp"``), MBConv with squeeze-excitation."""
    from timm.models.maxxvit import MaxxVit, MaxxVitCfg, MaxxVitConvCfg, MaxxVitTransformerCfg

    cfg = MaxxVitCfg(
        embed_dim=(16, 32), depths=(1, 1), block_type=("M", "M"), stem_width=8,
        conv_cfg=MaxxVitConvCfg(expand_ratio=2.0, attn_ratio=0.25),
        transformer_cfg=MaxxVitTransformerCfg(dim_head=8, rel_pos_type="mlp", window_size=(2, 2), grid_size=(2, 2)),
    )
    model = MaxxVit(cfg, img_size=32, num_classes=CLASSES).eval()
    patterns = (
        "stages.0.blocks.0.attn_block.attn.qkv.", "stages.0.blocks.0.attn_block.attn.rel_pos.mlp.fc2.",
        "stages.0.blocks.0.attn_grid.attn.proj.", "stages.1.blocks.0.conv.se.", "head.fc.",
    )
    return _classifier(model, "x", _images(32, n), CLASSES, patterns)


def timm_resnetv2_bit(n: int = N) -> ZooCase:
    """BiT's ResNet-V2 (tiny): weight-standardized convolutions (``StdConv2d``), GroupNorm, pre-activation."""
    from functools import partial

    from timm.layers import GroupNormAct, StdConv2d
    from timm.models.resnetv2 import ResNetV2

    model = ResNetV2(
        layers=(1, 1), channels=(16, 32), num_classes=CLASSES, stem_chs=8, conv_layer=StdConv2d,
        norm_layer=partial(GroupNormAct, num_groups=4), preact=True,
    ).eval()
    patterns = ("stem.conv.", "stages.0.blocks.0.conv1.", "stages.1.blocks.0.downsample.", "head.")
    return _classifier(model, "x", _images(16, n), CLASSES, patterns)


def timm_nfnet(n: int = N) -> ZooCase:
    """A normalizer-free network (tiny): ``ScaledStdConv2d`` with gains, squeeze-excitation, skip gains."""
    from timm.models.nfnet import NfCfg, NormFreeNet

    cfg = NfCfg(
        depths=(1, 1), channels=(16, 32), stem_chs=8, stem_type="3x3", group_size=8, bottle_ratio=0.5,
        attn_layer="se", attn_kwargs=dict(rd_ratio=0.5), num_features=32, act_layer="gelu",
    )
    model = NormFreeNet(cfg, num_classes=CLASSES).eval()
    _random_zero_inits(model)  # the skip gains start at zero: no residual branch would reach the loss
    patterns = ("stem.conv.", "stages.0.0.conv1.", "stages.0.0.attn_last.", "stages.1.0.conv3.", "head.")
    return _classifier(model, "x", _images(16, n), CLASSES, patterns)


def timm_hiera(n: int = N) -> ZooCase:
    """Hiera (a tiny config of timm's ``Hiera``): ``Unroll`` permutes the tokens into the batch
    axis and back (``[N, L, C] → [N·4, …] → [N·16, …] → [N, L, C]``) inside one module without
    a rule, mask-unit attention on windows, token pooling by ``amax`` over strided views."""
    from timm.models.hiera import Hiera

    model = Hiera(
        img_size=(32, 32), embed_dim=8, num_heads=1, num_classes=CLASSES, stages=(1, 1, 1), q_pool=2,
        mask_unit_size=(4, 4), mask_unit_attn=(True, True, False), patch_kernel=(3, 3), patch_stride=(4, 4),
        patch_padding=(1, 1), mlp_ratio=1.0,
    ).eval()
    with torch.no_grad():  # timm starts the classifier at zero: nothing before it would reach the loss
        model.head.fc.weight.normal_(0, 0.5)
    patterns = ("patch_embed.", "pos_embed", "blocks.0.attn.qkv.", "blocks.1.proj.", "blocks.2.norm1.", "head.fc.")
    return _classifier(model, "x", _images(32, n), CLASSES, patterns)


def timm_gcvit(n: int = N) -> ZooCase:
    """GCViT (a tiny config of timm's ``GlobalContextVit``): window attention on windows merged
    with the batch, whose query (every second block) is each image's global query repeated to its windows
    (``repeat_interleave(B // N, dim=0)``), and ``RelPosBias``, a leaf without a rule adding
    ``table[index]`` to the scores; MBConv blocks (squeeze-excitation) and pooling make the global query."""
    from timm.models.gcvit import GlobalContextVit

    model = GlobalContextVit(
        img_size=32, window_size=(2, 2), embed_dim=8, depths=(2, 1), num_heads=(1, 2), mlp_ratio=1.0,
        num_classes=CLASSES,
    ).eval()
    patterns = (
        "stages.0.global_block.blocks.conv2.conv_pw.", "stages.0.blocks.1.attn.rel_pos.", "stages.0.blocks.1.attn.qkv.",
        "stages.1.blocks.0.attn.proj.", "head.fc.",
    )
    return _classifier(model, "x", _images(32, n), CLASSES, patterns)


def timm_samvit(n: int = N) -> ZooCase:
    """SAM's image encoder (a tiny config of timm's ``VisionTransformerSAM``): attention whose
    ``q, k, v`` merge the batch axis with the heads after a permute
    (``qkv.permute(2, 0, 3, 1, 4).reshape(3, B·heads, L, d)``), decomposed relative positions
    (``einsum`` with position tables looked up from parameters) as the mask of
    ``F.scaled_dot_product_attention``, window attention with padding, a convolutional neck."""
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    model = VisionTransformerSAM(
        img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, use_rel_pos=True, window_size=3,
        global_attn_indexes=(1,), neck_chans=8, num_classes=CLASSES, global_pool="avg", mlp_ratio=1.0,
    ).eval()
    patterns = ("blocks.0.attn.rel_pos_h", "blocks.0.attn.qkv.", "blocks.1.attn.rel_pos_w", "blocks.1.attn.proj.", "head.fc.")
    return _classifier(model, "x", _images(32, n), CLASSES, patterns)


def _byoanet(self_attn_layer: str, n: int, **attn_kwargs) -> ZooCase:
    """A tiny config of timm's ``ByobNet`` with one self-attention stage on a 4 × 4 map."""
    from timm.models.byobnet import ByobNet, ByoBlockCfg, ByoModelCfg

    cfg = ByoModelCfg(
        blocks=(
            ByoBlockCfg(type="bottle", d=1, c=16, s=2, gs=0, br=0.5),
            ByoBlockCfg(type="self_attn", d=1, c=16, s=1, gs=0, br=0.5),
        ),
        stem_chs=8, stem_type="", stem_pool="", fixed_input_size=self_attn_layer == "bottleneck",
        self_attn_layer=self_attn_layer, self_attn_kwargs=dict(num_heads=2, **attn_kwargs),
    )
    model = ByobNet(cfg, img_size=16, num_classes=CLASSES).eval()
    _random_zero_inits(model)
    patterns = ("stem.conv.", "stages.1.0.self_attn.", "stages.1.0.post_attn.", "head.fc.")
    return _classifier(model, "x", _images(16, n), CLASSES, patterns)


def timm_botnet(n: int = N) -> ZooCase:
    """BoTNet (timm's ``BottleneckAttn``): self-attention over the feature map with the heads
    merged into the batch axis (``[N·heads, HW, d]``), plus ``PosEmbedRel``'s relative-position
    logits (two offset tables and a pad-and-reshape skew), a leaf module with parameters."""
    return _byoanet("bottleneck", n)


def timm_halonet(n: int = N) -> ZooCase:
    """HaloNet (timm's ``HaloAttn``): attention of each 2 × 2 block over its 4 × 4 window
    (overlapping windows cut by ``kv.unfold``), heads and blocks merged with the batch,
    ``PosEmbedRel``'s relative logits over the window."""
    return _byoanet("halo", n, block_size=2, halo_size=1)


def timm_resnetblur(n: int = N) -> ZooCase:
    """A ResNet with timm's ``BlurPool2d`` (anti-aliased downsampling, as in TResNet and the
    ``resnetblur`` models): a fixed binomial filter per channel after reflect padding."""
    from timm.layers import BlurPool2d
    from timm.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=CLASSES, aa_layer=BlurPool2d, channels=(8, 8, 8, 8),
                   stem_width=8, stem_type="deep").eval()
    _random_zero_inits(model)  # the branches' last BatchNorm weights start at zero
    patterns = ("conv1.0.", "layer2.0.conv1.", "layer3.0.bn1.", "fc.")
    return _classifier(model, "x", _images(32, n), CLASSES, patterns)


def timm_ghostnetv2(n: int = N) -> ZooCase:
    """GhostNetV2: its DFC attention pools by ``F.avg_pool2d``, gates with a sigmoid and
    upsamples the gate by ``F.interpolate`` in the module's ``forward``."""
    from timm.models.ghostnet import GhostNet

    # three blocks (k, expansion, channels, squeeze-excitation, stride); the third has the attention
    cfgs = [[[3, 8, 8, 0, 1]], [[3, 16, 8, 0, 2]], [[3, 16, 8, 0.25, 1]]]
    model = GhostNet(cfgs, num_classes=CLASSES, version="v2").eval()
    patterns = ("conv_stem.", "blocks.2.0.ghost1.short_conv.", "blocks.2.0.ghost1.primary_conv.", "classifier.")
    return _classifier(model, "x", _images(16, n), CLASSES, patterns)


# ----------------------------------------------------------- transformers
def hf_bert(n: int = N) -> ZooCase:
    import transformers

    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, num_labels=CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(config)
    patterns = ("bert.embeddings.", "bert.encoder.layer.0.attention.", "bert.pooler.", "classifier.")
    case = _classifier(model, "input_ids", _ids(n), CLASSES, patterns, logits=lambda out: out.logits)
    # a padded batch, as users call it: the first sample's last two tokens are padding
    # (the attention mask becomes a constant [N, 1, L, L] of F.scaled_dot_product_attention)
    mask = torch.ones(n, LENGTH, dtype=torch.long)
    mask[0, -2:] = 0
    case.inputs["attention_mask"] = mask
    return case


def hf_deberta_v2(n: int = N) -> ZooCase:
    """Disentangled attention views the batch and the heads as one axis (``[N·H, L, d]``)."""
    import transformers

    config = transformers.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, num_labels=CLASSES, relative_attention=True, position_buckets=4,
        pos_att_type=["p2c", "c2p"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        norm_rel_ebd="layer_norm",
    )
    model = transformers.DebertaV2ForSequenceClassification(config)
    # the relative embeddings trainable: computed from parameters only, repeated to the merged
    # rows of the heads (``w.repeat(N, 1, 1)``, curvhook/row_groups.py)
    patterns = (
        "deberta.embeddings.LayerNorm.", "deberta.encoder.rel_embeddings.", "deberta.encoder.LayerNorm.",
        "deberta.encoder.layer.0.attention.", "classifier.",
    )
    return _classifier(model, "input_ids", _ids(n), CLASSES, patterns, logits=lambda out: out.logits)


def hf_beit(n: int = N) -> ZooCase:
    """Relative position bias from a module called without tensors (``bias(window_size)``),
    and a learned mask token at a per-sample mask (``bool_masked_pos``)."""
    import transformers

    config = transformers.BeitConfig(
        image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, num_labels=CLASSES, use_relative_position_bias=True, use_mask_token=True,
        use_mean_pooling=True, layer_scale_init_value=0.1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = transformers.BeitForImageClassification(config).eval()
    patterns = ("beit.embeddings.mask_token", "beit.layers.0.relative_position_bias.",
                "beit.layers.0.attention.q_proj.", "beit.layers.0.lambda_1", "classifier.")
    case = _classifier(model, "pixel_values", _images(16, n), CLASSES, patterns, logits=lambda out: out.logits)
    masked = torch.zeros(n, 4, dtype=torch.bool)
    masked[0, 1] = masked[-1, 3] = True
    case.inputs["bool_masked_pos"] = masked
    return case


def hf_swin(n: int = N) -> ZooCase:
    """Window attention on ``[N·windows, L, C]``: the frozen patch embeddings merged by
    ``window_partition`` (two views), the merged windows through the attention block."""
    import transformers

    config = transformers.SwinConfig(
        image_size=16, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=2,
        num_labels=CLASSES, drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = transformers.SwinForImageClassification(config).eval()
    patterns = ("swin.encoder.layers.0.blocks.0.attention.", "swin.encoder.layers.1.blocks.0.mlp.fc2.", "classifier.")
    return _classifier(model, "pixel_values", _images(16, n), CLASSES, patterns, logits=lambda out: out.logits)


def hf_swin_shifted(n: int = N) -> ZooCase:
    """Shifted windows (the second block of a stage): the attention mask is the shift mask
    copied for every sample (``repeat``) plus the relative position bias, so it carries the
    batch axis (merged with the windows) and the grad of the bias table."""
    import transformers

    config = transformers.SwinConfig(
        image_size=16, patch_size=4, embed_dim=8, depths=[2], num_heads=[2], window_size=2,
        num_labels=CLASSES, drop_path_rate=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = transformers.SwinForImageClassification(config).eval()
    patterns = ("swin.encoder.layers.0.blocks.1.attention.", "swin.encoder.layers.0.blocks.1.layernorm_before.",
                "classifier.")
    return _classifier(model, "pixel_values", _images(16, n), CLASSES, patterns, logits=lambda out: out.logits)


def hf_convnextv2(n: int = N) -> ZooCase:
    """ConvNeXt V2: Hugging Face's own ``ConvNextV2GRN`` (weight and bias ``[1, 1, 1, C]``), the
    rule of timm's ``GlobalResponseNorm`` on a view of it; before session 46 the fallback
    (past 150 s a step at the default width). GRN starts at zero: its parameters randomized."""
    import transformers

    config = transformers.ConvNextV2Config(
        num_channels=3, patch_size=4, image_size=16, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
        num_labels=CLASSES, drop_path_rate=0.0,
    )
    model = transformers.ConvNextV2ForImageClassification(config).eval()
    for m in model.modules():
        if type(m).__name__ == "ConvNextV2GRN":
            torch.nn.init.uniform_(m.weight, -1.0, 1.0)
            torch.nn.init.uniform_(m.bias, -0.5, 0.5)
    patterns = ("convnextv2.encoder.stages.0.layers.0.grn.", "convnextv2.encoder.stages.0.layers.0.pwconv1.",
                "convnextv2.encoder.stages.1.layers.0.grn.", "classifier.")
    return _classifier(model, "pixel_values", _images(16, n), CLASSES, patterns, logits=lambda out: out.logits)


def hf_bit(n: int = N) -> ZooCase:
    """BiT: Hugging Face's own ``WeightStandardizedConv2d`` (``F.batch_norm`` of the kernel, then
    ``F.conv2d``), the rule of timm's ``StdConv2d``; before session 46 the fallback. Group norms
    with activations (``BitGroupNormActivation``), pre-activation bottlenecks."""
    import transformers

    config = transformers.BitConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_groups=2,
        num_labels=CLASSES, drop_path_rate=0.0,
    )
    model = transformers.BitForImageClassification(config).eval()
    patterns = ("bit.embedder.convolution.", "bit.encoder.stages.0.layers.0.conv2.",
                "bit.encoder.stages.1.layers.0.downsample.", "classifier.")
    return _classifier(model, "pixel_values", _images(16, n), CLASSES, patterns, logits=lambda out: out.logits)


def hf_pvt(n: int = N) -> ZooCase:
    """PVT v1: position tables resized by ``F.interpolate`` (to their own size: transformers
    compares the patch count with the image size) and added to every sample; spatial-reduction
    attention (a strided convolution of the keys and values). Before session 46 the resized
    tables took dense Jacobians of the whole map (out of memory at the default width)."""
    import transformers

    config = transformers.PvtConfig(
        image_size=16, num_encoder_blocks=2, depths=[1, 1], sequence_reduction_ratios=[2, 1], hidden_sizes=[8, 16],
        patch_sizes=[4, 2], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], num_labels=CLASSES,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0,
    )
    model = transformers.PvtForImageClassification(config).eval()
    patterns = ("pvt.encoder.patch_embeddings.0.position_embeddings", "pvt.encoder.patch_embeddings.1.",
                "pvt.encoder.block.0.0.attention.self.sequence_reduction.", "classifier.")
    return _classifier(model, "pixel_values", _images(16, n), CLASSES, patterns, logits=lambda out: out.logits)


def hf_distilbert(n: int = N) -> ZooCase:
    import transformers

    config = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=8, n_layers=1, n_heads=2, hidden_dim=16, max_position_embeddings=16,
        num_labels=CLASSES, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
    )
    model = transformers.DistilBertForSequenceClassification(config)
    patterns = ("distilbert.embeddings.", "distilbert.transformer.layer.0.attention.q_lin.", "distilbert.transformer.layer.0.ffn.", "pre_classifier.", "classifier.")
    return _classifier(model, "input_ids", _ids(n), CLASSES, patterns, logits=lambda out: out.logits)


def hf_gpt2(n: int = N) -> ZooCase:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    return _language_model(model, _ids(n), VOCAB, ("transformer.wpe.", "transformer.h.0.attn.", "transformer.h.0.ln_1.", "transformer.h.0.mlp.", "transformer.ln_f."))


def hf_llama(n: int = N) -> ZooCase:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=16, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config)
    case = _language_model(model, _ids(n), VOCAB, ("model.embed_tokens.", "model.layers.0.self_attn.", "model.layers.0.input_layernorm.", "model.layers.0.mlp.down_proj.", "model.norm."))
    # LlamaRMSNorm and the rotary tables compute in float32 by design, also in a float64
    # model: the model itself, and so any two ways of differentiating it, agree to float32.
    case.rtol = 1e-6
    return case


def _moe_language_model(model: nn.Module, n: int, patterns) -> ZooCase:
    """A mixture-of-experts language model: experts run by transformers' eager loop (its
    default ``grouped_mm`` has no float64 kernel), weights of RMSNorms and experts random."""
    model.config._experts_implementation = "eager"
    _randomize_rms_norms(model)
    for name, p in model.named_parameters():
        if ".experts." in name or name.endswith(("gate.weight", "router.weight")):
            torch.nn.init.normal_(p, 0.0, 0.5)
    case = _language_model(model, _ids(n), VOCAB, patterns)
    case.rtol = 1e-6  # the router's softmax and the RMSNorms compute in float32 by design
    return case


def hf_mixtral(n: int = N) -> ZooCase:
    """Mixtral: a sparse mixture of experts (``MixtralSparseMoeBlock``: a top-2 router, experts
    stored as 3-d parameters, tokens gathered per expert by a data-dependent index), served as
    one call by curvhook/rules/mixture_of_experts.py; before session 46 the fallback."""
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=6, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return _moe_language_model(transformers.MixtralForCausalLM(config), n,
                               ("model.layers.0.mlp.", "model.layers.0.input_layernorm.", "model.norm."))


def hf_qwen2_moe(n: int = N) -> ZooCase:
    """Qwen2-MoE: routed experts (top-2 of 4, unnormalized weights) plus a shared expert behind
    a sigmoid gate, one call for the mixture-of-experts rule."""
    import transformers

    config = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=6, moe_intermediate_size=6,
        shared_expert_intermediate_size=5, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return _moe_language_model(transformers.Qwen2MoeForCausalLM(config), n,
                               ("model.layers.0.mlp.", "model.norm."))


def hf_deepseek_v3(n: int = N) -> ZooCase:
    """DeepSeek-V3: multi-head latent attention (its keys written into ``new_empty`` by two
    ``copy_`` through slices: views of a constant, read off their geometry), a mixture of experts
    routed by sigmoid scores (the best experts of the best group, chosen with a correction bias;
    weights renormalized and scaled) plus an ungated shared expert, one call for the
    mixture-of-experts rule."""
    import transformers

    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=6, moe_intermediate_size=6, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=4, kv_lora_rank=4, qk_rope_head_dim=2,
        qk_nope_head_dim=2, v_head_dim=2, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
        n_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=0, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = transformers.DeepseekV3ForCausalLM(config)
    for m in model.modules():
        if hasattr(m, "e_score_correction_bias"):
            torch.nn.init.normal_(m.e_score_correction_bias, 0.0, 0.3)
    return _moe_language_model(model, n, ("model.layers.0.mlp.", "model.layers.0.self_attn.", "model.norm."))


def hf_granite_moe(n: int = N) -> ZooCase:
    """Granite-MoE: a router child ``router`` whose weights are the softmax of the top-k logits
    (computed in float32) and Mixtral's experts, one call for the mixture-of-experts rule;
    before session 47 the fallback (past 150 s per DiagGGNApprox step at width 512)."""
    import transformers

    config = transformers.GraniteMoeConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=6, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return _moe_language_model(transformers.GraniteMoeForCausalLM(config), n,
                               ("model.layers.0.block_sparse_moe.", "model.layers.0.input_layernorm.", "model.norm."))


def hf_gpt_oss(n: int = N) -> ZooCase:
    """GPT-OSS: experts with biases, gate and up interleaved in ``[E, H, 2I]``, a clamped GLU
    ``(u_c + 1) ∘ g_c σ(α g_c)``, a router with a bias taking the softmax of the top-k logits,
    attention with sinks over a sliding window and full layers; one call for the
    mixture-of-experts rule (before session 47 the fallback, past 150 s at width 512)."""
    import transformers

    config = transformers.GptOssConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=6, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=16,
        sliding_window=3, layer_types=["sliding_attention", "full_attention"], swiglu_limit=1.5,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = transformers.GptOssForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or "router" in name or name.endswith("sinks"):
                p.normal_(0.0, 0.7)
    return _moe_language_model(model, n, ("model.layers.1.mlp.", "model.layers.0.self_attn.", "model.norm."))


def hf_deepseek_v2(n: int = N) -> ZooCase:
    """DeepSeek-V2: latent attention whose rotary embedding multiplies complex numbers
    (``view_as_complex(q) * e^{iθ}``, back by ``view_as_real``; refused before session 47,
    the dense route takes no complex tensors) and a mixture of experts routed by a softmax
    times a scale, one call for the mixture-of-experts rule."""
    import transformers

    config = transformers.DeepseekV2Config(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=6, moe_intermediate_size=6, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=4, kv_lora_rank=4, qk_rope_head_dim=4,
        qk_nope_head_dim=2, v_head_dim=2, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        routed_scaling_factor=1.5, first_k_dense_replace=0, max_position_embeddings=16, topk_method="greedy",
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return _moe_language_model(transformers.DeepseekV2ForCausalLM(config), n,
                               ("model.layers.0.mlp.", "model.layers.0.self_attn.", "model.norm."))


def hf_falcon(n: int = N, alibi: bool = False) -> ZooCase:
    """Falcon: ``FalconLinear`` (an ``nn.Linear`` whose ``forward`` is ``x @ W.T + b``), multi-query
    attention with rotary embeddings and the attention parallel to the MLP (falcon-7b's layout);
    with ``alibi``, falcon-rw-1b's: ALiBi biases, sequential attention and MLP."""
    import transformers

    config = transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, alibi=alibi,
        multi_query=not alibi, parallel_attn=not alibi, bias=alibi, attention_dropout=0.0, hidden_dropout=0.0,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = transformers.FalconForCausalLM(config)
    patterns = ("transformer.word_embeddings.", "transformer.h.0.self_attention.", "transformer.h.0.mlp.dense_4h_to_h.",
                "transformer.ln_f.")
    case = _language_model(model, _ids(n), VOCAB, patterns)
    case.inputs["use_cache"] = False
    return case


def hf_gemma(n: int = N) -> ZooCase:
    """Gemma: ``GemmaRMSNorm`` stores its weight as an offset from one, ``x̂ ∘ (1 + w)``, and
    computes in float32; multi-query attention with rotary embeddings; GeGLU MLP."""
    import transformers

    config = transformers.GemmaConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = transformers.GemmaForCausalLM(config)
    for m in model.modules():  # (the offsets start at zero: 1 + w = 1 would hide a rule that ignores them)
        if type(m).__name__ == "GemmaRMSNorm":
            torch.nn.init.uniform_(m.weight, -0.5, 0.5)
    patterns = ("model.embed_tokens.", "model.layers.0.input_layernorm.", "model.layers.0.self_attn.o_proj.",
                "model.layers.0.mlp.", "model.norm.")
    case = _language_model(model, _ids(n), VOCAB, patterns)
    case.rtol = 1e-6  # GemmaRMSNorm computes in float32 by design, also in a float64 model
    return case


def _randomize_rms_norms(model: nn.Module) -> None:
    """RMSNorm weights away from their initial ones (a rule that ignored them would pass)."""
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)


def hf_phi3(n: int = N) -> ZooCase:
    """Phi-3: ``Phi3RMSNorm`` (one of about 150 copies of ``LlamaRMSNorm`` that transformers defines,
    matched by the end of its name and proven on probes), the query, key and value from one fused
    projection, the gate and up projections fused (``gate_up_proj(x).chunk(2, -1)``)."""
    import transformers

    config = transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
    )
    model = transformers.Phi3ForCausalLM(config)
    _randomize_rms_norms(model)
    patterns = ("model.embed_tokens.", "model.layers.0.input_layernorm.", "model.layers.0.self_attn.qkv_proj.",
                "model.layers.0.mlp.", "model.norm.")
    case = _language_model(model, _ids(n), VOCAB, patterns)
    case.rtol = 1e-6  # Phi3RMSNorm computes in float32 by design, also in a float64 model
    return case


def hf_olmo2(n: int = N) -> ZooCase:
    """OLMo 2: ``Olmo2RMSNorm`` on the queries and keys before the heads split (``q_norm(q_proj(x))``)
    and after the attention and the MLP (post-norm residuals); matched by name and proven on probes."""
    import transformers

    config = transformers.Olmo2Config(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = transformers.Olmo2ForCausalLM(config)
    _randomize_rms_norms(model)
    patterns = ("model.embed_tokens.", "model.layers.0.self_attn.", "model.layers.0.post_attention_layernorm.",
                "model.layers.0.post_feedforward_layernorm.", "model.layers.0.mlp.down_proj.", "model.norm.")
    case = _language_model(model, _ids(n), VOCAB, patterns)
    case.rtol = 1e-6  # Olmo2RMSNorm computes in float32 by design, also in a float64 model
    return case


def hf_cohere(n: int = N) -> ZooCase:
    """Command-R: ``CohereLayerNorm`` (a LayerNorm without bias, in float32; matched by the end of
    its name and proven on probes), the attention parallel to the MLP, rotary embeddings on
    interleaved pairs (``stack([-x2, x1], -1).flatten(-2)``), scaled logits."""
    import transformers

    config = transformers.CohereConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = transformers.CohereForCausalLM(config)
    for m in model.modules():
        if type(m).__name__ == "CohereLayerNorm":
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
    patterns = ("model.embed_tokens.", "model.layers.0.input_layernorm.", "model.layers.0.self_attn.",
                "model.layers.0.mlp.down_proj.", "model.norm.")
    case = _language_model(model, _ids(n), VOCAB, patterns)
    case.rtol = 1e-6  # CohereLayerNorm computes in float32 by design, also in a float64 model
    return case


def hf_opt(n: int = N) -> ZooCase:
    """The decoder layer runs its MLP on merged rows (``h.reshape(-1, H)``), so each layer is one
    module for the fallback, which replays it: called with ``use_cache=False`` (with the cache
    it is refused, ``test_a_key_value_cache_is_refused_by_name``)."""
    import transformers

    config = transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, ffn_dim=16, num_attention_heads=2,
        max_position_embeddings=16, word_embed_proj_dim=8, dropout=0.0, attention_dropout=0.0,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )
    model = transformers.OPTForCausalLM(config)
    patterns = ("model.decoder.embed_positions.", "model.decoder.layers.0.self_attn.", "model.decoder.layers.0.fc1.",
                "model.decoder.final_layer_norm.")
    case = _language_model(model, _ids(n), VOCAB, patterns)
    case.inputs["use_cache"] = False
    return case


def hf_bloom(n: int = N) -> ZooCase:
    """ALiBi attention on the batch merged with the heads: ``alibi.baddbmm(q, k)`` with ``q``, ``k``
    ``[N·H, L, d]`` and the bias ``[N·H, 1, L]`` from each sample's padding mask (a constant with
    one slice per row), then ``bmm`` with the values; ``BloomGelu``, a custom ``autograd.Function``.
    The word embeddings are tied to the language-model head."""
    import transformers

    config = transformers.BloomConfig(
        vocab_size=VOCAB, hidden_size=8, n_layer=1, n_head=2, hidden_dropout=0.0, attention_dropout=0.0,
    )
    model = transformers.BloomForCausalLM(config).eval()  # (in training mode BloomGelu is a Function torch.func cannot run)
    patterns = ("transformer.word_embeddings.", "transformer.h.0.self_attention.", "transformer.h.0.mlp.dense_4h_to_h.",
                "transformer.ln_f.")
    case = _language_model(model, _ids(n), VOCAB, patterns)
    mask = torch.ones(n, LENGTH, dtype=torch.long)
    mask[0, -2:] = 0  # padding: ALiBi's positions (cumsum of the mask) differ by sample
    # (left padding masks whole rows of the first queries: the model itself gives NaN)
    case.inputs.update(attention_mask=mask, use_cache=False)
    from transformers.models.bloom.modeling_bloom import bloom_gelu_forward

    # BloomGelu's forward is a custom autograd.Function (its backward: the derivative of
    # bloom_gelu_forward); curvhook serves the module by its rule, torch.func needs the function
    case.reference_forwards = tuple(
        (m, bloom_gelu_forward) for m in model.modules() if type(m).__name__ == "BloomGelu"
    )
    return case


def hf_gpt2_classifier(n: int = N) -> ZooCase:
    """A padded batch of a decoder classifier: ``logits[arange(N), last_token]`` pools each sample."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=8, n_layer=1, n_head=2, n_positions=16, num_labels=CLASSES, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1,
    )
    model = transformers.GPT2ForSequenceClassification(config)
    patterns = ("transformer.wte.", "transformer.h.0.attn.", "transformer.ln_f.", "score.")
    ids, mask = _ids(n), torch.ones(n, LENGTH, dtype=torch.long)
    mask[0, -2:] = 0  # the first sample's last two tokens are padding
    ids = ids.masked_fill(mask == 0, config.pad_token_id)
    case = _classifier(model, "input_ids", ids, CLASSES, patterns, logits=lambda out: out.logits)
    case.inputs["attention_mask"] = mask
    return case


def hf_t5(n: int = N) -> ZooCase:
    """An encoder-decoder: cross-attention from the decoder to the encoder's output."""
    import transformers

    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1, num_heads=2,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    model = keep_trainable(transformers.T5ForConditionalGeneration(config).double(), (
        "shared.", "encoder.block.0.layer.0.SelfAttention.", "encoder.block.0.layer.0.layer_norm.",
        "decoder.block.0.layer.1.EncDecAttention.", "decoder.final_layer_norm.",
    ))  # (the language-model head is ``shared``, tied)
    decoder_ids = torch.randint(2, VOCAB, (n, 3))
    labels = torch.randint(0, VOCAB, (n, 3))

    def loss(logits: Tensor, crit: nn.Module) -> Tensor:
        return crit(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    inputs = {"input_ids": torch.randint(2, VOCAB, (n, LENGTH)), "decoder_input_ids": decoder_ids}
    # T5LayerNorm computes its variance in float32 by design, also in a float64 model.
    return ZooCase(model, inputs, loss, logits=lambda out: out.logits, rtol=1e-6)


def hf_bart(n: int = N, pairs: bool = False) -> ZooCase:
    """A sequence classifier that pools each sample's end-of-sequence token with a boolean
    mask (``h[ids.eq(eos), :]``), and a decoder whose cross-attention reads a frozen encoder
    (its keys and values are constants with one slice per sample). ``pairs``: sentence pairs,
    ``<s> A </s></s> B </s>``, three end-of-sequence tokens in every sample (merged rows,
    split again by ``.view(N, -1, H)``)."""
    import transformers

    config = transformers.BartConfig(
        vocab_size=VOCAB, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=16,
        num_labels=CLASSES, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, classifier_dropout=0.0,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
    )
    model = transformers.BartForSequenceClassification(config)
    patterns = (
        "model.decoder.embed_positions.", "model.decoder.layers.0.self_attn.",
        "model.decoder.layers.0.encoder_attn.q_proj.", "model.decoder.layers.0.encoder_attn.out_proj.",
        "model.decoder.layers.0.final_layer_norm.", "classification_head.",
    )
    # one end-of-sequence token per sample (three with pairs), at different places: the first
    # sample is padded
    length = LENGTH + 2 if pairs else LENGTH
    ids = torch.randint(3, VOCAB, (n, length))
    ids[:, -1] = config.eos_token_id
    mask = torch.ones(n, length, dtype=torch.long)
    ids[0, -2:] = torch.tensor([config.eos_token_id, config.pad_token_id])
    mask[0, -1] = 0
    if pairs:
        ids[:, 0] = config.bos_token_id
        for i in range(n):  # the end of the first sentence and the start of the second
            ids[i, 2 + i % 2 : 4 + i % 2] = config.eos_token_id
    case = _classifier(model, "input_ids", ids, CLASSES, patterns, logits=lambda out: out.logits)
    case.inputs["attention_mask"] = mask
    return case


MODELS: dict[str, tuple[str, Callable[..., ZooCase]]] = {
    "torchvision.resnet18": ("torchvision", tv_resnet18),
    "torchvision.mobilenet_v3_small": ("torchvision", tv_mobilenet_v3_small),
    "torchvision.convnext_tiny": ("torchvision", tv_convnext_tiny),
    "torchvision.VisionTransformer": ("torchvision", tv_vit),
    "torchvision.swin_v2": ("torchvision", tv_swin_v2),
    "torchvision.swin": ("torchvision", tv_swin),
    "timm.vit_tiny": ("timm", timm_vit_tiny),
    "timm.mobilevitv2_050": ("timm", timm_mobilevitv2),
    "timm.convnext_atto": ("timm", timm_convnext_atto),
    "timm.resnet10t": ("timm", timm_resnet10t),
    "timm.levit_128s": ("timm", timm_levit),
    "timm.maxvit": ("timm", timm_maxvit),
    "timm.resnetv2_bit": ("timm", timm_resnetv2_bit),
    "timm.nfnet": ("timm", timm_nfnet),
    "timm.hiera": ("timm", timm_hiera),
    "timm.gcvit": ("timm", timm_gcvit),
    "timm.samvit": ("timm", timm_samvit),
    "timm.botnet": ("timm", timm_botnet),
    "timm.halonet": ("timm", timm_halonet),
    "timm.resnetblur": ("timm", timm_resnetblur),
    "timm.ghostnetv2": ("timm", timm_ghostnetv2),
    "transformers.Bert": ("transformers", hf_bert),
    "transformers.DistilBert": ("transformers", hf_distilbert),
    "transformers.DebertaV2": ("transformers", hf_deberta_v2),
    "transformers.Beit": ("transformers", hf_beit),
    "transformers.Swin": ("transformers", hf_swin),
    "transformers.Swin-shifted": ("transformers", hf_swin_shifted),
    "transformers.ConvNextV2": ("transformers", hf_convnextv2),
    "transformers.Bit": ("transformers", hf_bit),
    "transformers.Pvt": ("transformers", hf_pvt),
    "transformers.GPT2": ("transformers", hf_gpt2),
    "transformers.GPT2-classifier": ("transformers", hf_gpt2_classifier),
    "transformers.Llama": ("transformers", hf_llama),
    "transformers.OPT": ("transformers", hf_opt),
    "transformers.Bloom": ("transformers", hf_bloom),
    "transformers.Falcon": ("transformers", hf_falcon),
    "transformers.Gemma": ("transformers", hf_gemma),
    "transformers.Phi3": ("transformers", hf_phi3),
    "transformers.Olmo2": ("transformers", hf_olmo2),
    "transformers.Cohere": ("transformers", hf_cohere),
    "transformers.Mixtral": ("transformers", hf_mixtral),
    "transformers.Qwen2Moe": ("transformers", hf_qwen2_moe),
    "transformers.DeepseekV3": ("transformers", hf_deepseek_v3),
    "transformers.DeepseekV2": ("transformers", hf_deepseek_v2),
    "transformers.GraniteMoe": ("transformers", hf_granite_moe),
    "transformers.GptOss": ("transformers", hf_gpt_oss),
    "transformers.Falcon-alibi": ("transformers", lambda n=N: hf_falcon(n, alibi=True)),
    "transformers.T5": ("transformers", hf_t5),
    "transformers.Bart": ("transformers", hf_bart),
    "transformers.Bart-pairs": ("transformers", lambda n=N: hf_bart(n, pairs=True)),
}


# -------------------------------------------------------------- reference
@dataclass
class ExactReference:
    """``J`` ``[N, O, P]``, ``G`` ``[P, P]`` over the trainable parameters, in order."""

    J: Tensor
    G: Tensor
    params: list[nn.Parameter]
    hessian_diag: Tensor  # [N, *out], the diagonal of the per-sample loss Hessians


def exact_reference(case: ZooCase) -> ExactReference:
    """The batch Jacobian and the GGN of ``case`` with torch.func (float64)."""
    names = [n for n, p in case.model.named_parameters() if p.requires_grad]
    params = [p for p in case.model.parameters() if p.requires_grad]
    values = tuple(p.detach() for p in params)

    def logits(*ps: Tensor) -> Tensor:
        return case.logits(functional_call(case.model, dict(zip(names, ps)), (), case.inputs))

    for module, forward in case.reference_forwards:
        module.forward = forward
    try:
        with torch.no_grad():
            out = logits(*values)
        n, o = out.shape[0], out[0].numel()
        jacs = jacrev(logits, argnums=tuple(range(len(values))))(*values)
    finally:
        for module, _ in case.reference_forwards:
            del module.forward
    J = torch.cat([j.reshape(n, o, -1) for j in jacs], dim=2)
    H = hessian(lambda f: case.loss(f, case.criterion))(out).reshape(n, o, n, o)
    blocks = torch.stack([H[i, :, i] for i in range(n)])  # per-sample blocks H_n: [N, O, O]
    G = torch.einsum("nap,naq->pq", J, torch.bmm(blocks, J))
    return ExactReference(J, G, params, torch.diagonal(blocks, dim1=1, dim2=2).reshape(out.shape))


def loss_hessian_diag(case: ZooCase) -> Tensor:
    """The diagonal of the per-sample loss Hessians at the model output, ``[N, *out]``."""
    with torch.no_grad():
        out = case.logits(case.forward())
    n, o = out.shape[0], out[0].numel()
    H = hessian(lambda f: case.loss(f, case.criterion))(out).reshape(n, o, n, o)
    return torch.stack([H[i, :, i].diagonal() for i in range(n)]).reshape(out.shape)

