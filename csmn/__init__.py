"""csmn: personalized hashtags and post texts for photo archives (CSMN, Park et al., CVPR 2017)."""

__version__ = "0.1.0"
