"""Trainer integrations (installed as ``ckpt_hooks.patches``): each module offers install() / uninstall().

Megatron-LM and MindSpore hooks arrive with their issues; this package is their home.
"""
