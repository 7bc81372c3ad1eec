"""``curvhook/rules/padding.py``: constant, reflection, replication and circular padding, 1d/2d/3d.

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
    "zeropad1d": (seq(prefix_conv(1, 2), nn.ZeroPad1d((1, 2)), *head()), float_input((2, 5))),
    "zeropad2d": (seq(prefix_conv(2, 2), nn.ZeroPad2d((1, 0, 2, 1)), *head()), float_input((2, 3, 3))),
    "zeropad3d": (seq(prefix_conv(3, 1), nn.ZeroPad3d(1), *head()), float_input((1, 2, 2, 3))),
    "constantpad1d": (seq(prefix_conv(1, 2), nn.ConstantPad1d(2, 0.7), *head()), float_input((2, 3))),
    "constantpad2d_negative": (
        seq(prefix_conv(2, 2), nn.ConstantPad2d((-1, 2, 1, -1), 0.5), *head()),
        float_input((2, 4, 5)),
    ),
    "constantpad3d": (
        seq(prefix_conv(3, 1), nn.ConstantPad3d((0, 1, 1, 0, 1, 1), -0.3), *head()),
        float_input((1, 2, 2, 2)),
    ),
    "reflectionpad1d": (seq(prefix_conv(1, 2), nn.ReflectionPad1d((2, 3)), *head()), float_input((2, 4))),
    "reflectionpad2d": (seq(prefix_conv(2, 2), nn.ReflectionPad2d((1, 2, 2, 1)), *head()), float_input((2, 3, 4))),
    "reflectionpad3d": (seq(prefix_conv(3, 1), nn.ReflectionPad3d(1), *head()), float_input((1, 2, 3, 2))),
    "replicationpad1d": (seq(prefix_conv(1, 2), nn.ReplicationPad1d((3, 1)), *head()), float_input((2, 3))),
    "replicationpad2d": (seq(prefix_conv(2, 2), nn.ReplicationPad2d((2, 0, 1, 2)), *head()), float_input((2, 3, 3))),
    "replicationpad3d": (seq(prefix_conv(3, 1), nn.ReplicationPad3d((1, 0, 0, 2, 1, 1)), *head()), float_input((1, 2, 2, 2))),
    "circularpad1d": (seq(prefix_conv(1, 2), nn.CircularPad1d((2, 1)), *head()), float_input((2, 4))),
    "circularpad2d": (seq(prefix_conv(2, 2), nn.CircularPad2d(1), *head()), float_input((2, 3, 3))),
    "circularpad3d": (seq(prefix_conv(3, 1), nn.CircularPad3d((1, 1, 0, 1, 1, 0)), *head()), float_input((1, 2, 2, 2))),
    # the input needs no Jacobian: only the pullback to the head's parameters
    "zeropad2d_first_layer": (seq(nn.ZeroPad2d(1), *head()), float_input((2, 2, 3))),
    "reflectionpad1d_first_layer": (seq(nn.ReflectionPad1d(1), *head()), float_input((2, 4))),
}


test_layer_one_sample, test_layer_batch_noncontiguous_and_float32, test_table_covers_every_registered_type = (
    layer_table_tests(CASES, "padding")
)
