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

Layouts: pp = cp = 1 (the hooks need every layer and the whole sequence on this rank). Under tensor
parallelism with sequence parallelism the decoder's states are sequence-parallel chunks; they are gathered
over the tensor-parallel group, so every rank reads the whole sequence, as the Talker at that layout needs.
That is the text-only Thinker LM (``build_thinker_lm``): the multimodal ``OmniThinker`` runs at
tp = pp = cp = 1 only, so a Talker at tp > 1 conditions on text (no media placeholders in its context). At
pp > 1 nothing is captured here: a text context needs only the Thinker's embedding-table rows, which live on
the first stage beside the Talker's first stage (models/talker/model.py).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region


class SignalsCaptured(Exception):
    """Raised by the accept layer's hook under ``stop=True``: the Talker needs nothing after it."""


@contextlib.contextmanager
def capture_thinker_signals(language_model: torch.nn.Module, accept_hidden_layer: int,
                            stop: bool = False) -> Iterator[Dict]:
    """Yields a dict that each forward of ``language_model`` (a megatron GPTModel holding the whole sequence and
    all its layers: pp = cp = 1; any tp, the whole sequence gathered under sequence parallelism) fills with
    ``embeds`` and ``hidden`` [B, S, Ht] (views, no copy, at tp = 1; without autograd history when the Thinker
    runs frozen under no_grad). ``stop``: the accept layer's hook raises ``SignalsCaptured`` once it has stored
    them (``run_to_accept_layer``), so the later layers and the output logits are never computed."""
    layers, config = language_model.decoder.layers, language_model.config
    if not 1 <= accept_hidden_layer <= len(layers) or config.pipeline_model_parallel_size > 1:
        raise ValueError(f"accept_hidden_layer {accept_hidden_layer}: the model holds {len(layers)} decoder layers"
                         f" (pipeline size {config.pipeline_model_parallel_size})")
    if config.context_parallel_size > 1:
        raise ValueError(f"capture_thinker_signals needs the whole sequence: context parallel size "
                         f"{config.context_parallel_size} (parallel.cp) must be 1")
    store: Dict[str, torch.Tensor] = {}

    def whole(states: torch.Tensor) -> torch.Tensor:
        """[S or S/tp, B, Ht] -> [B, S, Ht]."""
        if config.sequence_parallel:
            states = gather_from_sequence_parallel_region(states, tensor_parallel_output_grad=False)
        return states.transpose(0, 1)

    def decoder_input(module, args, kwargs):
        store["embeds"] = whole(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    def layer_output(module, args, output):
        store["hidden"] = whole(output[0])
        if stop:  # every tensor-parallel rank reaches it at the same layer: no collective left half-done
            raise SignalsCaptured()

    handles = [language_model.decoder.register_forward_pre_hook(decoder_input, with_kwargs=True),
               layers[accept_hidden_layer - 1].register_forward_hook(layer_output)]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def run_to_accept_layer(forward: Callable[[], Any], language_model: torch.nn.Module,
                        accept_hidden_layer: int) -> Dict[str, torch.Tensor]:
    """``embeds`` and ``hidden`` of the Thinker forward that ``forward()`` starts, which stops after the accept
    layer (a frozen Thinker conditioning the Talker: the release reads layer 24 of 48 and never the Thinker's
    logits, so half the layers and the logits over its vocabulary are skipped)."""
    with capture_thinker_signals(language_model, accept_hidden_layer, stop=True) as signals:
        try:
            forward()
        except SignalsCaptured:
            pass
    if "hidden" not in signals:
        raise RuntimeError("the Thinker's forward returned without reaching its accept layer")
    return dict(signals)
