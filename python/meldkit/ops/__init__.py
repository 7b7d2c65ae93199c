"""meldkit's public ops: torch.library custom ops with native CPU/CUDA kernels, each backed by a
pure-PyTorch reference (``<op>_ref``) that is always available and defines its semantics."""

from meldkit.ops.blend import BlendPlan, blend_tensors
from meldkit.ops.blend_ref import blend_ref
from meldkit.ops.logit_fusion import LogitFusionResult, logit_fusion
from meldkit.ops.logit_fusion_ref import logit_fusion_ref
from meldkit.ops.merge import magnitude_threshold, merge_tensor_list, merge_tensors
from meldkit.ops.routed_lora import routed_lora
from meldkit.ops.routed_lora_ref import routed_lora_ref
from meldkit.ops.weighted_sum import weighted_sum
from meldkit.ops.weighted_sum_ref import weighted_sum_ref

# Every op family with native kernels, by the stem its files share (csrc/<op>, bindings/<op>.cpp).
NATIVE_OPS = ("weighted_sum", "merge", "routed_lora", "logit_fusion", "blend")

__all__ = [
    "NATIVE_OPS",
    "BlendPlan",
    "LogitFusionResult",
    "blend_ref",
    "blend_tensors",
    "logit_fusion",
    "logit_fusion_ref",
    "magnitude_threshold",
    "merge_tensor_list",
    "merge_tensors",
    "routed_lora",
    "routed_lora_ref",
    "weighted_sum",
    "weighted_sum_ref",
]
