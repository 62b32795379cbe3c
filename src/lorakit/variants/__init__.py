"""LoRA variants: what a `lorakit.layers.LoraLayer` adapter may carry beyond A and B, each a small
module of free functions the layer calls (no subclass per variant).

    dora.py    DoRA: a learned magnitude per output feature over the normalised direction W + s·B·A
    init.py    initialisations that read the base weight (PiSSA, OLoRA) or shape A and B (orthogonal), and
               PEFT's conversion of PiSSA / OLoRA adapters to the original base
"""
