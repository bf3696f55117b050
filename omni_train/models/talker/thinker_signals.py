"""What the Talker reads from our Thinker: its input embeddings and its hidden states after
``accept_hidden_layer`` decoder layers (transformers' ``hidden_states[0]`` and ``hidden_states[accept]``).

``capture_thinker_signals`` hooks our megatron Thinker LM (``OmniThinker.language_model`` or a bare
``build_thinker_lm`` model) for the duration: every forward stores ``embeds`` (the decoder's input, media
features merged in) and ``hidden`` (decoder layer ``accept - 1``'s output), both [B, S, Ht]. The Talker reads
``embeds`` only at text positions, where it is the embedding-table row, and ``hidden`` only at media
placeholders. One difference from transformers: our DeepStack additions are a forward hook on decoder
layers 0 .. k-1 that runs before this one, so for ``accept_hidden_layer <= k`` the captured state includes
the layer's DeepStack features, which transformers' recorded ``hidden_states`` do not (the release reads
layer 24 with k = 3: no difference).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator

import torch


@contextlib.contextmanager
def capture_thinker_signals(language_model: torch.nn.Module, accept_hidden_layer: int) -> Iterator[Dict]:
    """Yields a dict that each forward of ``language_model`` (a megatron GPTModel holding the whole sequence and
    all its layers: tp = pp = cp = 1, as OmniThinker requires) fills with ``embeds`` and ``hidden`` [B, S, Ht]
    (views, no copy; without autograd history when the Thinker runs frozen under no_grad)."""
    layers = language_model.decoder.layers
    if not 1 <= accept_hidden_layer <= len(layers) or language_model.config.pipeline_model_parallel_size > 1:
        raise ValueError(f"accept_hidden_layer {accept_hidden_layer}: the model holds {len(layers)} decoder layers"
                         f" (pipeline size {language_model.config.pipeline_model_parallel_size})")
    store: Dict[str, torch.Tensor] = {}

    def decoder_input(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        store["embeds"] = hidden.transpose(0, 1)

    def layer_output(module, args, output):
        store["hidden"] = output[0].transpose(0, 1)

    handles = [language_model.decoder.register_forward_pre_hook(decoder_input, with_kwargs=True),
               layers[accept_hidden_layer - 1].register_forward_hook(layer_output)]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()
