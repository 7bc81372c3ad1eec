"""``curvhook/rules/embedding.py``: ``nn.Embedding`` (and its options the rule declines).

Every case of the table runs BatchJacobian, DiagGGN, DiagGGNApprox and FullGGN in
one ``extend`` block and compares them in float64 with the brute-force reference
(``tests/reference.py``; DiagGGNApprox on the equivalent one-hot model, see
``helpers.check_embedding_model``), for one sample and for a batch of three; the
registered rule (never the torch.func fallback) must serve every module; a
float32 run is compared with the same reference.
"""

from torch import nn

from helpers import (
    layer_table_tests,
    head,
    index_input,
    seq,
)

# name -> (model builder, input builder); the embedding comes first (helpers.check_embedding_model)
CASES = {
    "embedding_padding_idx": (
        seq(nn.Embedding(5, 3, padding_idx=2), *head()),
        index_input(5, (6,)),
    ),
    "embedding_multi_dim_indices": (
        seq(nn.Embedding(4, 2), nn.Tanh(), *head()),
        index_input(4, (2, 3)),
    ),
    "embedding_plain": (
        seq(nn.Embedding(6, 3), *head()),
        index_input(6, (4,)),
    ),
    "embedding_negative_padding_idx": (
        seq(nn.Embedding(4, 3, padding_idx=-1), nn.Sigmoid(), *head()),
        index_input(4, (5,)),
    ),
    "embedding_one_index_per_sample": (
        seq(nn.Embedding(5, 4), nn.Tanh(), *head()),
        index_input(5, (1,)),
    ),
}


test_layer_one_sample, test_layer_batch_noncontiguous_and_float32, test_table_covers_every_registered_type = (
    layer_table_tests(CASES, "embedding")
)
