"""Retrieval-head identification (DuoAttention's gate training) on Hugging Face models.

Needs torch and transformers only, never vLLM: ``data`` builds the synthetic passkey samples,
``gating`` the gated attention function, ``train`` the loop and checkpoints, ``export`` the
pattern folder in the reference format.
"""
