"""SynthSeg-style synthetic CT from real label maps: (CT-like image in HU, pancreas label) pairs for training."""
