"""Shared tasks that several experiments train and cache: the planted-facts LM and the fine-tuned classifier."""
