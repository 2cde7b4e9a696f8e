"""Trainable modules of ReHyAt: the feature maps of the linear branch."""

from .feature_maps import FEATURE_MAPS, HedgehogFeatureMap, PolynomialFeatureMap, make_feature_map, set_fused_feature_maps

__all__ = ["FEATURE_MAPS", "HedgehogFeatureMap", "PolynomialFeatureMap", "make_feature_map", "set_fused_feature_maps"]
