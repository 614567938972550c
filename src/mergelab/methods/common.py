"""Parameters shared by many methods, declared once so that their meaning and ranges agree."""

from mergelab.methods.registry import Param

WEIGHT = Param("weight", float, "Weight of this model's contribution (mergekit: required).")
DENSITY = Param(
    "density", float, "Fraction of this model's task-vector entries to keep (1 keeps all).",
    default=1.0, low=0.0, high=1.0,
)
LAMBDA = Param("lambda", float, "Scale applied to the merged task vector.", default=1.0)
INT8_MASK = Param(
    "int8_mask", bool, "mergekit memory option; accepted for compatibility, no effect on the result.",
    default=False,
)


def normalize(default: bool) -> Param:
    return Param(
        "normalize", bool,
        "Divide the merged task vector by the summed weights (of agreeing models, with a sign election).",
        default=default,
    )


def rescale_flag(default: bool) -> Param:
    return Param(
        "rescale", bool,
        "Rescale each sparsified task vector to its original L1 norm (mergekit semantics; with "
        "semantics: paper, DARE and DELLA divide each kept entry by its keep probability instead, "
        "false drops only, and ties, whose reference has no rescale, refuses true).",
        default=default,
    )


SEMANTICS = Param(
    "semantics", str,
    "'mergekit' reproduces mergekit 0.1.5; 'paper' follows the method's paper and reference code "
    "(see docs/methods.md for what changes).",
    default="mergekit", choices=("mergekit", "paper"), per_layer=False,
)


# Data-informed methods (regmean, regmean_plusplus, fisher) read a per-model file of calibration
# statistics, named by this per-model parameter and loaded by the engine as an auxiliary input.
STATISTICS = "statistics"
STATISTICS_PARAM = Param(
    STATISTICS, str, "Path to this model's statistics file (from `mergelab calibrate`), tensors named like the model's.",
)
