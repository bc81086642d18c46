"""Post-training from preferences and rewards: DPO (`dpo.py`)."""
