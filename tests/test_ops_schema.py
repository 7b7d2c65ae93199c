"""The ops' written schemas (:mod:`meldkit.ops._library`) are the ones torch infers from the
functions' type hints, so the hints (what readers and type checkers see) and the schema
(what the dispatcher enforces) say the same thing."""

import importlib
import inspect

import pytest
import torch

logit_fusion, merge, routed_lora, weighted_sum = (
    importlib.import_module(f"meldkit.ops.{m}")
    for m in ("logit_fusion", "merge", "routed_lora", "weighted_sum")
)

OPS = {
    "logit_fusion": (logit_fusion._logit_fusion, ()),
    "merge_tensors": (merge._merge_tensors, ()),
    "weighted_sum": (weighted_sum._weighted_sum, ()),
    "weighted_sum_out": (weighted_sum._weighted_sum_out, ("out",)),
    "routed_lora": (routed_lora._routed_lora, ()),
    "routed_lora_dropout": (routed_lora._routed_lora_dropout, ()),
    "routed_lora_backward": (routed_lora._routed_lora_backward, ()),
    "routed_lora_dropout_backward": (routed_lora._routed_lora_dropout_backward, ()),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_written_schema_is_the_inferred_one(name):
    infer = getattr(torch.library, "infer_schema", None)
    if infer is None or "op_name" not in inspect.signature(infer).parameters:
        pytest.skip(f"torch {torch.__version__} cannot infer schemas from postponed hints")
    op, mutates = OPS[name]
    written = str(getattr(torch.ops.meldkit, name).default._schema)
    inferred = infer(op._init_fn, mutates_args=mutates, op_name=f"meldkit::{name}")
    assert written == inferred


def test_dropout_ops_are_kept_out_of_cuda_graphs():
    """Where torch has the tag, the dropout variants carry ``cudagraph_unsafe`` (a captured
    call would replay its capture's seed) and the others do not."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None or not routed_lora._CUDAGRAPH_UNSAFE:
        pytest.skip(f"torch {torch.__version__} has no cudagraph_unsafe tag")
    for name in OPS:
        tags = getattr(torch.ops.meldkit, name).default.tags
        assert (tag in tags) == ("dropout" in name), name
