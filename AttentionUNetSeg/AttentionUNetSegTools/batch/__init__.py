"""``attention-unet-seg batch``: cohorts through one loaded model, locally or on Ray, resumable."""
