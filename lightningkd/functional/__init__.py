"""The distillation losses as pure tensor functions (same maths as :mod:`lightningkd.distillers`)."""

from lightningkd.functional.acam_kd import acam_masks, acam_terms, cross_attention_fusion
from lightningkd.functional.at import at_loss, attention_map
from lightningkd.functional.bpkd import boundary_masks, bpkd_loss, bpkd_terms
from lightningkd.functional.cirkd import cirkd_memory_terms, cirkd_minibatch_loss
from lightningkd.functional.cwd import cwd_loss
from lightningkd.functional.dist import dist_loss, dist_terms
from lightningkd.functional.dkd import dkd_loss, dkd_terms
from lightningkd.functional.fgd import fgd_attention, fgd_loss, fgd_masks, fgd_terms
from lightningkd.functional.fitnet import fitnet_loss
from lightningkd.functional.kd import kd_loss
from lightningkd.functional.maskd import dice_diversity, maskd_loss, token_masks
from lightningkd.functional.mgd import mgd_keep_mask, mgd_loss
from lightningkd.functional.nd import nd_loss
from lightningkd.functional.ofa import ofa_cross_entropy, ofa_loss, ofa_target_weights
from lightningkd.functional.pixel_kd import pixel_kd_loss
from lightningkd.functional.pkd import pkd_loss, pkd_standardize
from lightningkd.functional.rkd import rkd_angle_loss, rkd_distance_loss, rkd_loss, rkd_terms
from lightningkd.functional.scalekd import (
    dct_2d,
    dct_matrix,
    dfm_dc_removed_loss,
    dfm_loss,
    idct_2d,
    remove_dc,
    scalekd_logit_loss,
    scalekd_terms,
)
from lightningkd.functional.skd import skd_loss
from lightningkd.functional.transkd import (
    transkd_fuse,
    transkd_hcl_levels,
    transkd_hcl_loss,
    transkd_pea_loss,
    transkd_terms,
)

__all__ = [
    "acam_masks",
    "acam_terms",
    "cross_attention_fusion",
    "dice_diversity",
    "maskd_loss",
    "token_masks",
    "at_loss",
    "attention_map",
    "boundary_masks",
    "bpkd_loss",
    "bpkd_terms",
    "cirkd_memory_terms",
    "cirkd_minibatch_loss",
    "cwd_loss",
    "dist_loss",
    "dist_terms",
    "dkd_loss",
    "dkd_terms",
    "fgd_attention",
    "fgd_loss",
    "fgd_masks",
    "fgd_terms",
    "fitnet_loss",
    "kd_loss",
    "mgd_keep_mask",
    "mgd_loss",
    "nd_loss",
    "ofa_cross_entropy",
    "ofa_loss",
    "ofa_target_weights",
    "pixel_kd_loss",
    "pkd_loss",
    "pkd_standardize",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
    "rkd_terms",
    "dct_2d",
    "dct_matrix",
    "dfm_dc_removed_loss",
    "dfm_loss",
    "idct_2d",
    "remove_dc",
    "scalekd_logit_loss",
    "scalekd_terms",
    "skd_loss",
    "transkd_fuse",
    "transkd_hcl_levels",
    "transkd_hcl_loss",
    "transkd_pea_loss",
    "transkd_terms",
]
