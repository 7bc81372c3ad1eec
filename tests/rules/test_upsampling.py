"""``curvhook/rules/upsampling.py``: ``nn.Upsample`` in every mode it serves, 1d/2d/3d,
and ``UpsamplingNearest2d``/``UpsamplingBilinear2d``.

Every case of the table runs BatchJacobian, DiagGGN, DiagGGNApprox and FullGGN in
one ``extend`` block and compares them in float64 with the brute-force reference
(``tests/reference.py``), for one sample and for a batch of three with a
non-contiguous input; the registered rule (never the torch.func fallback) must
serve every module; a float32 run is compared with the same reference.
"""

from torch import nn

from helpers import (
    layer_table_tests,
    float_input,
    head,
    prefix_conv,
    seq,
)

# name -> (model builder, input builder)
CASES = {
    "upsample_nearest1d_size": (
        seq(prefix_conv(1, 2), nn.Upsample(size=7, mode="nearest"), *head()),
        float_input((2, 3)),
    ),
    "upsample_nearest2d_scale": (
        seq(prefix_conv(2, 2), nn.Upsample(scale_factor=(2, 1.5), mode="nearest"), *head()),
        float_input((2, 3, 4)),
    ),
    "upsample_nearest_exact3d": (
        seq(prefix_conv(3, 1), nn.Upsample(size=(3, 5, 2), mode="nearest-exact"), *head()),
        float_input((1, 2, 3, 2)),
    ),
    "upsample_linear1d_align": (
        seq(prefix_conv(1, 2), nn.Upsample(size=8, mode="linear", align_corners=True), *head()),
        float_input((2, 3)),
    ),
    "upsample_bilinear_fractional_scale": (
        seq(prefix_conv(2, 2), nn.Upsample(scale_factor=1.7, mode="bilinear"), *head()),
        float_input((2, 3, 4)),
    ),
    "upsample_bilinear_align_corners": (
        seq(prefix_conv(2, 2), nn.Upsample(size=(5, 7), mode="bilinear", align_corners=True), *head()),
        float_input((2, 3, 4)),
    ),
    "upsample_bicubic": (
        seq(prefix_conv(2, 1), nn.Upsample(scale_factor=2, mode="bicubic"), *head()),
        float_input((1, 3, 4)),
    ),
    "upsample_trilinear_recompute": (
        seq(prefix_conv(3, 1), nn.Upsample(scale_factor=1.5, mode="trilinear", recompute_scale_factor=True),
            *head()),
        float_input((1, 2, 3, 2)),
    ),
    "upsampling_bilinear2d_module": (
        seq(prefix_conv(2, 2), nn.UpsamplingBilinear2d(scale_factor=2), *head()),
        float_input((2, 3, 3)),
    ),
    "upsampling_nearest2d_module": (
        seq(prefix_conv(2, 2), nn.UpsamplingNearest2d(size=(4, 5)), *head()),
        float_input((2, 3, 3)),
    ),
    # downsampling, and a first layer (the input needs no Jacobian)
    "upsample_linear1d_downsample": (
        seq(prefix_conv(1, 2), nn.Upsample(size=3, mode="linear"), *head()),
        float_input((2, 5)),
    ),
    "upsample_nearest2d_first_layer": (
        seq(nn.Upsample(scale_factor=2, mode="nearest"), *head()),
        float_input((2, 2, 3)),
    ),
}


test_layer_one_sample, test_layer_batch_noncontiguous_and_float32, test_table_covers_every_registered_type = (
    layer_table_tests(CASES, "upsampling")
)
